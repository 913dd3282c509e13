"""The write side: bounded contexts (messages, pure domain, NATS service) run by the actor runtime."""
