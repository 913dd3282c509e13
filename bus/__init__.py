"""Everything about NATS: connection, codec, subjects, streams, event store, actor runtime."""
