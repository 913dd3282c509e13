"""Settings, read from `JETSOURCE_*` environment variables (and a `.env` file)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class NatsIdentity(BaseModel):
    """How one role authenticates to an external NATS server: user + password, a credentials
    file or an nkey seed file (both need the `nkeys` package), and optionally TLS."""

    user: str | None = None
    password: str | None = Field(None, repr=False)
    creds: Path | None = None
    nkey_seed: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def given(self) -> bool:
        return bool(self.user or self.creds or self.nkey_seed)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _log_level(value: str) -> str:
    level = value.strip().upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"a log level is one of {', '.join(LOG_LEVELS)}")
    return level


class Settings(BaseSettings):
    """Every knob of a jetsource process. Unset URLs mean "start the embedded server"."""

    model_config = SettingsConfigDict(env_prefix="JETSOURCE_", env_file=".env", extra="ignore")

    nats_url: str | None = Field(None, description="external NATS URL(s), comma-separated; unset = embedded")
    database_url: str | None = Field(None, description="external PostgreSQL DSN; unset = embedded")
    data_dir: Path = Field(Path(".jetsource"), description="embedded servers' data directory")
    nats_port: int = 4222
    nats_monitor_port: int = 8222
    nats_cluster: int = Field(0, description="embedded cluster of this many nodes (odd, e.g. 3: `jetsource up "
                                             "--cluster 3`); node i listens on nats_port + i, its monitor on "
                                             "nats_monitor_port + i, its routes on nats_cluster_port + i; 0 = one server")
    nats_cluster_port: int = Field(6222, description="route port of the embedded cluster's first node")
    postgres_port: int = 5433
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    namespace: str = Field("", description="prefix of subjects and streams (isolates test runs)")
    db_schema: str = Field("public", description="PostgreSQL schema of the read models")
    stream_replicas: int = Field(1, description="3 on a NATS cluster; unset with nats_cluster: its size")
    duplicate_window_s: float = 300.0
    partitions: int = Field(1, ge=1, le=8, description="streams each context's events spread over, by a hash of the "
                                                  "aggregate id; fixed when the streams are created (a data "
                                                  "directory keeps the count it was created with). At most 8: "
                                                  "each partition of each read model is a projector holding "
                                                  "PostgreSQL connections")
    snapshot_every: int | None = Field(None, ge=0, description="every context's snapshot policy, overriding "
                                                               "the declared one: a snapshot every N events of an "
                                                               "aggregate (0 = none); unset = as declared (100)")
    actor_concurrency: int = 512
    actor_max_retries: int = 5
    append_batches_inflight: int = Field(2, description="atomic batches an actor keeps in flight (group commit)")
    append_batch_max: int = Field(1000, description="most messages per atomic batch (the server's limit, 1000)")
    request_timeout_s: float = 5.0
    read_wait_timeout_s: float = Field(2.0, description="longest a read waits for the projection to catch up")
    max_body_bytes: int = 64 * 1024
    projection_batch: int = 500
    projection_busy_linger_s: float = Field(
        0.1, ge=0, le=5, allow_inf_nan=False, description="under load, how long a projector lets events gather after a partial batch "
                         "(more events per transaction, less CPU; adds up to this to read-your-writes)")
    projector_nice: int = Field(10, description="`jetsource up` runs the projector at this nice level (0 = same as others)")
    rate_limit_per_s: float = Field(0.0, ge=0, le=1_000_000, allow_inf_nan=False, description="edge requests per second per client IP; 0 = off")
    max_inflight: int = Field(2048, ge=1, le=1_000_000, description="edge requests in flight before answering 503")
    api_tokens: str = Field("", description="comma-separated read-write bearer tokens; with none here nor in "
                                            "api_read_tokens the edge is open")
    api_read_tokens: str = Field("", description="comma-separated read-only bearer tokens (GET/HEAD)")
    metrics_open: bool = Field(False, description="serve the edge's /metrics without a token when tokens are set")
    breaker_failures: int = Field(5, ge=0, le=10_000, description="failures in a row (no responder, no reply in time, an "
                                                      "internal error) after which the edge refuses a subject's "
                                                      "requests unsent for a cool-down; 0 = never")
    breaker_cooldown_s: float = Field(5.0, gt=0, le=3600, allow_inf_nan=False,
                                      description="how long an open breaker refuses before it lets one probe through")
    task_modules: str = Field("", description="comma-separated modules whose register(registry) adds task types")
    context_modules: str = Field("", description="comma-separated modules that declare more bounded contexts "
                                                 "(`CONTEXT`) and process managers (`PROCESS_MANAGERS`)")
    saga_wait_s: float = Field(2.0, description="longest a confirm waits for its stock reservation (and a pay "
                                                "for one still being made) before answering")
    fulfil_step_s: float | None = Field(None, description="seconds each simulated fulfilment step takes "
                                                          "(pick, pack, hand over); unset = 0.01")
    worker_concurrency: int = Field(256, ge=1, le=100_000, description="tasks one worker process runs at once (asyncio: cheap while they await I/O)")
    task_lease_s: float = Field(30.0, description="a running task's lease; its worker renews it every third")
    metrics_port: int = Field(0, description="serve this role's Prometheus metrics on this port (0 = off; "
                                                "`jetsource up` gives its roles this port and the next ones)")
    log_level: Annotated[str, AfterValidator(_log_level)] = "INFO"
    log_format: Literal["text", "json"] = Field("text", description="text, or JSON lines (each with the role and, "
                                                                    "where known, the trace and correlation ids)")
    # NATS identity for an external server, for whatever role this process runs ...
    nats_user: str | None = None
    nats_password: str | None = Field(None, repr=False)
    nats_creds: Path | None = Field(None, description="a .creds file (JWT + nkey)")
    nats_nkey_seed: Path | None = Field(None, description="a file holding an nkey seed")
    nats_tls_ca: Path | None = Field(None, description="CA bundle to verify the server with")
    nats_tls_cert: Path | None = Field(None, description="client certificate (mutual TLS)")
    nats_tls_key: Path | None = Field(None, description="client certificate's key")
    # ... or per role (JSON: {"edge": {"user": "edge", "password": "..."}, "worker": {"creds": "..."}}).
    nats_identities: dict[str, NatsIdentity] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _cluster(self) -> Settings:
        if self.nats_cluster and (self.nats_cluster < 3 or self.nats_cluster % 2 == 0):
            # an even count tolerates no more failures than one node fewer, and splits votes
            raise ValueError(f"nats_cluster is an odd number of nodes, at least 3 (or 0), not {self.nats_cluster}")
        if self.nats_cluster and "stream_replicas" not in self.model_fields_set:
            self.stream_replicas = self.nats_cluster  # every node holds every stream
        return self

    @property
    def generic_nats_identity(self) -> NatsIdentity:
        return NatsIdentity(user=self.nats_user, password=self.nats_password, creds=self.nats_creds,
                            nkey_seed=self.nats_nkey_seed, tls_ca=self.nats_tls_ca, tls_cert=self.nats_tls_cert,
                            tls_key=self.nats_tls_key)

    @property
    def nats_embedded(self) -> bool:
        return not self.nats_url

    @property
    def postgres_embedded(self) -> bool:
        return not self.database_url

    def resolved_nats_url(self) -> str:
        """The URL(s) to connect to: the external ones, or every embedded node's."""
        if self.nats_url:
            return self.nats_url
        return ",".join(f"nats://127.0.0.1:{self.nats_port + i}" for i in range(max(1, self.nats_cluster)))

    def resolved_database_url(self) -> str:
        return self.database_url or f"postgresql://postgres@127.0.0.1:{self.postgres_port}/postgres"
