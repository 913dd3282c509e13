"""The HTTP edge: translates HTTP into NATS request-reply. No database, no business rule."""
