"""The read side: PostgreSQL read models built from the event streams, and their queries."""
