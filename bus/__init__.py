"""Everything about NATS: connection, codec, subjects, streams, event store, wire types, service plumbing."""
