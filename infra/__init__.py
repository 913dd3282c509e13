"""The composition root: settings, embedded servers, supervision, metrics, logging, the CLI."""
