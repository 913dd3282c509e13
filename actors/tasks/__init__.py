"""The task context: submit, schedule, run on workers, retry with backoff, dead-letter, cancel."""
