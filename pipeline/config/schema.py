"""The typed shape of the settings tree: one pydantic model per section.

Ranges are the seeds' "Validation Rules"; cross-field and per-environment rules live in
``rules.py`` so that every rule is reported at once, not just the first one pydantic meets.
Unknown keys are errors (``extra="forbid"``); ``report.py`` adds a did-you-mean hint.
"""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_serializer,
    field_validator,
    model_validator,
)

from pipeline.config.flag_value import FlagValue
from pipeline.contract.long_form import MODEL_WINDOW_S, WINDOW_STRIDE_S
from pipeline.contract.output_format import (
    DEFAULT_TARGETS,
    FORMATS,
    TARGET_RANGES,
    BitDepth,
    Channels,
    FormatName,
    Normalization,
    OutputSpec,
    SampleRate,
    check_mp3_bitrate,
    check_output_spec,
)
from pipeline.contract.remote_urls import check_host_pattern
from pipeline.errors import PipelineError

# A host allowlist entry: example.com, *.example.com or an IP address (pipeline/contract/remote_urls.py).
HostPattern = Annotated[str, AfterValidator(check_host_pattern)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class Environment(str, Enum):
    development = "development"
    staging = "staging"
    production = "production"


# The audio literals are the output-format table's (pipeline/contract/output_format.py), shared with the
# request and the worker, so a default can only name what a worker can write.
AudioFormat = FormatName


class AppSettings(_Section):
    """Who we are and where local state lives."""

    name: str = Field("musicgen-pipeline", min_length=1)
    environment: Environment = Environment.development
    debug: bool = False
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    data_dir: str = Field(".musicgen", min_length=1, description="local state: embedded broker, tiny models")
    profile: Literal["high_volume", "low_latency", "cost_optimized"] | None = None
    settings_poll_interval: float = Field(2.0, ge=0, le=3600,
                                          description="seconds between looks at the settings files "
                                                      "for a live reload; 0 = only on SIGHUP or "
                                                      "`settings reload`")


class BrokerSettings(_Section):
    """Celery's broker (Redis, Redis Sentinel or RabbitMQ) and result backend (Redis)."""

    url: str | None = Field(None, description="redis://, rediss://, sentinel://h1:26379;sentinel://"
                                             "h2:26379 or amqp:// (amqps://, pyamqp://) URL without "
                                             "the password; unset = the embedded file-system broker "
                                             "(development only)")
    password: SecretStr | None = None
    result_backend: str | None = Field(None, description="a Redis (redis://, rediss://, sentinel://); "
                                                        "defaults to the broker URL, required with "
                                                        "RabbitMQ")
    result_backend_password: SecretStr | None = Field(None, description="defaults to broker.password "
                                                                       "when the broker is a Redis")
    master_name: str = Field("mymaster", min_length=1, description="the Sentinel master (sentinel:// URLs)")
    visibility_timeout: int = Field(3900, ge=5, le=86400, description="seconds; must exceed the hard "
                                                                     "time limit (Redis and Sentinel)")
    heartbeat: int = Field(20, ge=0, le=600, description="seconds between AMQP heartbeats (RabbitMQ; "
                                                         "0 = off): a vanished node's jobs come "
                                                         "back after about two missed beats")
    consumer_timeout: int = Field(1800, ge=60, le=7 * 86400,
                                  description="seconds: the RabbitMQ server's consumer_timeout "
                                              "(rabbitmq.conf, in ms there; 1800 s is its default); "
                                              "must exceed the longest job's hard limit")
    queue_type: Literal["classic", "quorum"] = Field("classic", description="RabbitMQ queues: "
                                                     "classic (durable, with priorities) or quorum "
                                                     "(replicated, no priorities on RabbitMQ 3.x)")
    result_expires: int = Field(86400, ge=60, le=30 * 86400)
    connect_timeout: float = Field(5.0, gt=0, le=120)
    wait_replicas: int = Field(0, ge=0, le=8, description="Redis/Sentinel: replicas that must "
                               "confirm an enqueue (Redis WAIT) before it is accepted; 0 = off "
                               "(replication is asynchronous: a failover can drop the last jobs)")
    wait_timeout_ms: int = Field(250, ge=1, le=10000, description="how long an enqueue waits for "
                                 "broker.wait_replicas; past it the enqueue is refused, retryable")


class DatabaseSettings(_Section):
    """The quota tables and the usage ledger."""

    url: str = Field("sqlite:///.musicgen/musicgen.db", min_length=1)
    password: SecretStr | None = None
    pool_size: int = Field(5, ge=1, le=100)
    echo: bool = False


class ModelSettings(_Section):
    """Which MusicGen checkpoint a worker loads and how."""

    preset: str = Field("musicgen-small", min_length=1)
    source: str = Field("facebook/musicgen-small", min_length=1, description="hub id or local path")
    description: str = ""
    melody: bool = Field(False, description="the checkpoint accepts melody conditioning")
    stereo: bool = Field(False, description="the checkpoint generates two channels")
    max_duration: float = Field(MODEL_WINDOW_S, gt=0, le=MODEL_WINDOW_S, description="the model's window in seconds")
    cache_dir: str | None = None
    cache_size: int = Field(1, ge=1, le=20)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    compile: bool = False
    engine: Literal["hf", "static"] = Field(
        "static", description="static: our static-cache decode loop with continuous batching "
                              "(melody and long-form jobs still run on hf); hf: Hugging Face "
                              "generate, jobs batched by batch key")
    engine_memory_fraction: float = Field(
        0.6, gt=0, le=1, description="static engine on CUDA: the share of the device memory free "
                                     "after the model loaded that its KV cache may take (its "
                                     "rows are capped to fit); the rest is for activations, "
                                     "EnCodec and HF-path jobs")
    engine_self_check: bool = Field(
        True, description="static engine: run a short canary against HF generate before "
                          "serving with it, and serve the model with hf if it fails; off only "
                          "where its cost (~0.3 s on a GPU, seconds to a minute on a CPU with a "
                          "full-size model) outweighs the check")
    num_threads: int = Field(0, ge=0, le=256, description="torch CPU threads per worker process; 0 = torch's default")
    preload: bool = True
    offline: bool = False
    hub_token: SecretStr | None = Field(None, description="Hugging Face token for gated or "
                                        "private checkpoints (`models download`); HF_TOKEN works too")
    download_timeout: int = Field(180, ge=30, le=3600,
                                  description="seconds each Hugging Face hub request (metadata, file "
                                              "download) may wait for the server; not a cap on a "
                                              "whole download")


class GenerationSettings(_Section):
    """Bounds and defaults of a generation request."""

    default_duration: float = Field(10.0, ge=0.1, le=300.0)
    min_duration: float = Field(0.5, ge=0.01, le=10.0)
    max_duration: float = Field(120.0, ge=0.1, le=300.0,
                                description="past the model's window, windowed continuation")
    window_stride: float = Field(WINDOW_STRIDE_S, gt=0, le=300.0,
                                 description="seconds between long-form windows (under the window)")
    default_temperature: float = Field(1.0, ge=0.1, le=2.0)
    default_top_k: int = Field(250, ge=0, le=2048)
    default_top_p: float = Field(0.0, ge=0.0, le=1.0)
    default_guidance_scale: float = Field(3.0, ge=0.0, le=20.0)
    max_batch_size: int = Field(4, ge=1, le=32,
                                description="jobs of one model a worker generates in one call; "
                                            "more than 1 needs worker.pool = threads")
    batch_wait_ms: int = Field(50, ge=0, le=60000,
                               description="how long a job that arrives alone waits for company "
                                           "before its batch runs")
    stream_chunk_s: float = Field(1.0, ge=0.5, le=10.0,
                                  description="stream=True: seconds of audio per published chunk "
                                              "(shorter: sooner first audio, more decode calls)")


class AudioSettings(_Section):
    """Defaults of the finished file (a request may override each)."""

    sample_rate: SampleRate = 32000
    format: AudioFormat = "wav"
    bit_depth: BitDepth = Field(16, description="for wav and flac; lossy formats have none")
    channels: Channels = 1
    normalization: Normalization = "lufs"
    lufs_target: float = Field(DEFAULT_TARGETS["lufs"], ge=TARGET_RANGES["lufs"][0],
                               le=TARGET_RANGES["lufs"][1])
    peak_target_dbfs: float = Field(DEFAULT_TARGETS["peak"], ge=TARGET_RANGES["peak"][0],
                                    le=TARGET_RANGES["peak"][1])
    rms_target_dbfs: float = Field(DEFAULT_TARGETS["rms"], ge=TARGET_RANGES["rms"][0],
                                   le=TARGET_RANGES["rms"][1])
    mp3_bitrate: str = Field("192k", description="every mp3 request's bitrate, 8k to 320k")

    @field_validator("mp3_bitrate")
    @classmethod
    def _mp3_bitrate(cls, value: str) -> str:
        # Checked whatever the default format: any request may ask for mp3 and gets this rate.
        try:
            check_mp3_bitrate(value)
        except PipelineError as exc:
            raise ValueError(exc.message) from exc
        return value

    @model_validator(mode="after")
    def _renderable(self) -> AudioSettings:
        # A request that sets nothing gets exactly these defaults: they must be a combination a
        # worker can write (opus at 32000 Hz or flac at 8 bits would refuse every such request).
        target = {"lufs": self.lufs_target, "peak": self.peak_target_dbfs,
                  "rms": self.rms_target_dbfs}.get(self.normalization)
        spec = OutputSpec.model_construct(
            format=self.format, sample_rate=self.sample_rate, channels=self.channels,
            bit_depth=self.bit_depth if FORMATS[self.format].lossless else None,
            normalization=self.normalization, loudness_target=target, mp3_bitrate=self.mp3_bitrate)
        try:
            check_output_spec(spec)
        except PipelineError as exc:
            raise ValueError(f"the audio defaults cannot be written together ({exc.field}): "
                             f"{exc.message}") from exc
        return self


class StorageSettings(_Section):
    """Where finished files and temp files go."""

    output_dir: str = Field(".musicgen/outputs", min_length=1)
    temp_dir: str = Field(".musicgen/tmp", min_length=1)
    retention_days: int = Field(7, ge=1, le=365)
    # Results and melody inputs (pipeline/infra/storage_backends.py); the URL's shape is a rule.
    url: str | None = Field(None, description="unset = output_dir on the worker's disk; "
                                             "file:///shared/path = a shared folder; "
                                             "s3://bucket/prefix = S3-compatible object storage "
                                             "(the `storage` extra)")
    endpoint_url: str | None = Field(None, pattern=r"^https?://[^\s/]+(/\S*)?$",
                                     description="the S3 API of a store other than AWS "
                                                 "(MinIO, Ceph, R2): http(s)://host:port")
    region: str | None = Field(None, min_length=1)
    access_key_id: str | None = Field(None, min_length=1,
                                      description="unset = boto3's own chain (environment, "
                                                  "instance role)")
    secret_access_key: SecretStr | None = None
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    presign_expiry_s: int = Field(3600, ge=60, le=7 * 86400,
                                  description="how long a result's download_url works (S3 "
                                              "caps pre-signed URLs at 7 days)")
    inputs_prefix: str = Field("inputs", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$",
                               description="folder (or key prefix) of uploaded melodies, "
                                           "under the storage's root")
    melody_url_hosts: list[HostPattern] = Field(
        default_factory=list, description="hosts an https:// melody may be fetched from "
                                          "(example.com, *.example.com); empty = none")


class WebhookSettings(_Section):
    """Job-end events POSTed to a request's ``webhook_url``, signed in the Standard Webhooks
    style (pipeline/webhooks.py) and delivered by a task of their own (``musicgen.webhooks``)."""

    allowed_hosts: list[HostPattern] = Field(
        default_factory=list, description="hosts a webhook_url may name (example.com, "
                                          "*.example.com); empty = webhooks refused "
                                          "unless public_hosts")
    public_hosts: bool = Field(
        False, description="also any other host whose every address is public: loopback, "
                           "private, link-local and metadata addresses refused after DNS, at "
                           "enqueue and again when the worker connects (for customers' "
                           "receivers)")
    secret: SecretStr | None = Field(None, description="HMAC-SHA256 key: whsec_<base64> or text")
    timeout_s: float = Field(10.0, gt=0, le=120, description="seconds per delivery attempt")
    max_attempts: int = Field(5, ge=1, le=20)
    backoff: float = Field(2.0, gt=0, le=3600,
                           description="seconds before the second attempt, doubled each time "
                                       "(at most an hour)")
    progress_interval_s: float = Field(
        5.0, ge=1, le=3600, description="fewest seconds between two job.progress events of a "
                                        "job (webhook_events_filter with progress)")


class WorkerSettings(_Section):
    """One Celery worker per GPU: pool, limits, retries."""

    pool: Literal["solo", "threads", "prefork"] = "threads"
    concurrency: int | None = Field(None, ge=1, le=128,
                                    description="task slots; default 1, or twice "
                                                "generation.max_batch_size for the threads pool")
    prefetch_multiplier: int = Field(1, ge=1, le=16)
    soft_time_limit: int = Field(300, ge=1, le=86400, description="seconds")
    hard_time_limit: int = Field(360, ge=1, le=86400, description="seconds")
    time_limit_per_second: float = Field(2.0, ge=0, le=600,
                                         description="seconds of limit added per second of audio")
    time_limit_cap: int = Field(3600, ge=1, le=86400, description="longest scaled soft limit")
    max_retries: int = Field(3, ge=0, le=20)
    retry_backoff: float = Field(2.0, gt=0, le=600, description="first backoff in seconds, doubled each try")
    retry_backoff_max: float = Field(120.0, gt=0, le=3600)
    retry_jitter: bool = True
    redelivery_cap: int = Field(3, ge=1, le=20, description="deliveries before a job is declared poison")
    max_tasks_per_child: int = Field(0, ge=0, description="0 = unlimited")
    max_memory_per_child_mb: int = Field(0, ge=0, description="0 = unlimited")
    max_memory_percent: float = Field(85.0, ge=10.0, le=95.0,
                                      description="memory use (host RAM or GPU, the fuller) above "
                                                  "which, after a job and a cache cleanup, the "
                                                  "process takes no further job and is replaced")
    cleanup_threshold_percent: float = Field(75.0, ge=10.0, le=95.0,
                                             description="memory use above which the process empties "
                                                         "its model cache after a job")
    shutdown_grace: int = Field(30, ge=0, le=3600)


class RecoverySettings(_Section):
    """Fast recovery of a dead worker's jobs on a Redis broker (workers/heartbeat.py,
    workers/recovery.py): each worker beats and records the messages it holds; live workers
    re-publish the messages of one whose beats stopped, long before the visibility timeout.
    Off on brokers that requeue on connection loss themselves (RabbitMQ)."""

    enabled: bool = Field(True, description="beat and recover (Redis brokers only)")
    heartbeat_interval: float = Field(5.0, ge=0.5, le=300,
                                      description="seconds between a worker's beats")
    missed_beats: int = Field(3, ge=2, le=100,
                              description="beats a worker may miss before it counts as dead")
    scan_interval: float = Field(10.0, ge=1, le=3600,
                                 description="seconds between a live worker's looks for dead ones")


class RateLimitSettings(_Section):
    """A global rate limit across all workers, per model queue."""

    enabled: bool = True
    rate: str = Field("20/minute", pattern=r"^\d+\s*(/|per)\s*(\d+\s*)?(second|minute|hour|day)s?$",
                      description="jobs per window, e.g. 20/minute or 3 per 10 seconds")


class CircuitBreakerSettings(_Section):
    """Shared by all workers through Redis."""

    enabled: bool = True
    threshold: int = Field(5, ge=1, le=100)
    reset_timeout: float = Field(60.0, ge=1.0, le=3600.0)


class TierSettings(_Section):
    daily: int = Field(ge=-1, description="jobs per day; -1 = unlimited")
    monthly: int = Field(ge=-1, description="jobs per month; -1 = unlimited")
    daily_seconds: float = Field(-1, ge=-1, description="seconds of audio per day (asked for "
                                 "while a job runs, made once it succeeds); -1 = unlimited")
    monthly_seconds: float = Field(-1, ge=-1, description="seconds of audio per month; "
                                   "-1 = unlimited")
    max_priority: int | None = Field(None, ge=0, le=9, description="the highest request "
                                     "priority (0-9) this tier may ask for; unset: the built-in "
                                     "tier's (free 5, premium 7, others 9); see "
                                     "quotas.priority_over_max")

    def priority_cap(self, name: str) -> int:
        """``max_priority``, or the built-in default of the tier called ``name``."""
        if self.max_priority is not None:
            return self.max_priority
        return DEFAULT_MAX_PRIORITY.get(name, 9)


#: A tier's maximum priority when its max_priority is unset: the default priority (5) is the
#: free tier's ceiling, so only paying tiers jump the queue.
DEFAULT_MAX_PRIORITY = {"free": 5, "premium": 7}


class QuotaSettings(_Section):
    """Per-user job quotas (daily and monthly windows) and the priority each tier may use."""

    enabled: bool = True
    default_tier: str = "free"
    timezone: str = "UTC"
    # A request above its tier's max_priority is lowered to it (the handle says so), or refused
    # with unsupported_option. Not enforced with quotas off, like the limits.
    priority_over_max: Literal["clamp", "refuse"] = "clamp"
    tiers: dict[str, TierSettings] = Field(default_factory=lambda: {
        "free": TierSettings(daily=10, monthly=100, max_priority=5),
        "premium": TierSettings(daily=100, monthly=1000, max_priority=7),
        "enterprise": TierSettings(daily=-1, monthly=-1, max_priority=9),
    })


class ValidationSettings(_Section):
    """Limits on what a request may carry."""

    max_prompt_length: int = Field(800, ge=1, le=10000)
    max_melody_size_mb: float = Field(50.0, ge=1, le=1000)
    melody_min_duration: float = Field(1.0, ge=0.1, le=60.0)
    melody_max_duration: float = Field(300.0, ge=1.0, le=3600.0)
    melody_formats: list[str] = Field(default_factory=lambda: ["wav", "mp3", "flac", "ogg", "m4a", "aac"],
                                      min_length=1)
    melody_min_sample_rate: int = Field(16000, ge=8000, le=192000)


class MonitoringSettings(_Section):
    """Health thresholds (the seeds' defaults) and the Flower dashboard."""

    error_rate_threshold_percent: float = Field(20.0, ge=0.0, le=100.0)
    backlog_threshold: int = Field(50, ge=0, description="queued jobs per queue; 0 = no backpressure")
    latency_threshold: float = Field(180.0, gt=0, description="seconds, end to end")
    flower_address: str = "127.0.0.1"
    flower_port: int = Field(5555, ge=1, le=65535)
    flower_user: str | None = None
    flower_password: SecretStr | None = None
    metrics_port: int = Field(9808, ge=0, le=65535, description="worker Prometheus metrics; 0 = off")
    liveness_timeout_s: float = Field(120.0, gt=0, le=3600,
                                      description="the worker's /livez fails once a generation "
                                                  "loop has not stepped or ticked for this long")


class LoggingSettings(_Section):
    """How the worker, beat and the gateway write their logs."""

    format: Literal["text", "json"] = Field("text", description="json: one JSON object a line, "
                                            "job records with job_id, user (hashed), queue, "
                                            "attempt (pipeline/infra/log_format.py)")


class FeatureSettings(_Section):
    """Switches for optional behaviour.

    Per-user flags are ``bool | FlagRule`` (pipeline/contract/flags.py: percentage, tiers, allow, deny),
    each with one line in ``pipeline.contract.flags.FLAGS`` naming its reader.
    """

    melody_conditioning: FlagValue = Field(True, description="requests may carry a melody")
    priority_boost: FlagValue = Field(False, description="jobs queued one priority level higher")
    webhooks: FlagValue = Field(True, description="requests may carry a webhook_url")
    long_form: FlagValue = Field(True, description="durations past the model's window")
    streaming_generation: FlagValue = Field(
        False, description="requests may ask for stream=True: the audio published in chunks as "
                           "the static engine generates it")
    # A deployment switch, not per user: a plain bool.
    embedded_broker: bool = Field(True, description="development: run without Redis")


# Lower case because the loader lower-cases every key; no dots, so a dotted path stays one path;
# 64 characters, the ledger's column.
ExperimentName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]
Percent = Annotated[float, Field(gt=0, le=100, allow_inf_nan=False)]


class ExperimentSettings(_Section):
    """An A/B split of the requests that pin no model, over model presets (pipeline/ops/experiments.py).

    Rules across fields (percents sum to 100, known presets, the control among the variants,
    tiers that exist, end after start) live in rules.py, so they are reported with every other
    problem instead of only when the rest of this section is valid.
    """

    enabled: bool = Field(True, description="the switch: off assigns nobody, keeps the settings")
    variants: dict[str, Percent] = Field(min_length=1,
                                         description="model preset -> percent of the split")
    control: str = Field(min_length=1, description="the variant a request falls back to when "
                                                   "another variant's circuit breaker is open")
    tiers: list[str] | None = Field(None, description="quota tiers in the experiment; unset = all")
    start: AwareDatetime | None = Field(None, description="assign from this instant (inclusive)")
    end: AwareDatetime | None = Field(None, description="assign until this instant (exclusive)")

    @field_serializer("start", "end")
    def _iso(self, value: datetime | None) -> str | None:
        # Dumped as ISO 8601 text, which loads back as the same instant: `settings show`, `diff`
        # and `export` print dumped values as JSON or TOML, and neither knows a datetime.
        return None if value is None else value.isoformat()


class ApiSettings(_Section):
    """The HTTP gateway (``musicgen-pipeline api``, pipeline/gateway): a thin layer over the
    producer; every job still passes the producer's validation, quota and policies."""

    host: str = Field("127.0.0.1", min_length=1, description="address uvicorn binds")
    port: int = Field(8000, ge=1, le=65535)
    auth: bool = Field(True, description="require an API key (`musicgen-pipeline keys create`); "
                                         "false only in development (a settings rule)")
    # Signed URLs (pipeline/gateway/url_tokens.py) let a browser's EventSource and <audio> reach
    # one job's events, audio and partial file without the Authorization header they cannot send.
    url_token_ttl_s: int = Field(900, ge=30, le=86400,
                                 description="how long a job view's signed_urls work (seconds)")
    url_token_secret: SecretStr | None = Field(
        None, description="HMAC key of the signed URLs; unset = a random key shared by the "
                          "gateway processes through Redis")
    # An origin is scheme://host[:port] exactly: a path or a trailing slash never matches the
    # browser's Origin header, so such an entry would silently allow nothing.
    cors_origins: list[Annotated[str, Field(pattern=r"^(\*|https?://[^/\s]+)$")]] = Field(
        default_factory=list, description="origins a browser page may call from, e.g. "
                                          "https://app.example.com; empty = same origin only")
    max_body_kb: int = Field(64, ge=1, le=10240, description="largest JSON request body")
    max_upload_mb: float | None = Field(None, gt=0, le=1000,
                                        description="largest melody upload; unset = "
                                                    "validation.max_melody_size_mb")
    # The same syntax as rate_limit.rate; None switches the per-key limit off.
    rate: str | None = Field("120/minute",
                             pattern=r"^\d+\s*(/|per)\s*(\d+\s*)?(second|minute|hour|day)s?$",
                             description="requests per API key per window, e.g. 120/minute")
    # Joined as public_url + "/v1/jobs/...": a trailing slash would make "//v1", and a query or
    # fragment would swallow the path, so the pattern admits neither.
    public_url: str | None = Field(
        None, pattern=r"^https?://[^/\s?#@]+(/[^\s?#]*[^/\s?#])?$",
        description="the gateway's address as its callers reach it (https://music.example.com, "
                    "no trailing slash): makes webhook payloads' audio_url and partial_url "
                    "absolute; unset = paths relative to the gateway")


class Settings(_Section):
    """The whole validated settings tree; built once per process and passed explicitly."""

    app: AppSettings = AppSettings()
    broker: BrokerSettings = BrokerSettings()
    database: DatabaseSettings = DatabaseSettings()
    model: ModelSettings = ModelSettings()
    generation: GenerationSettings = GenerationSettings()
    audio: AudioSettings = AudioSettings()
    storage: StorageSettings = StorageSettings()
    worker: WorkerSettings = WorkerSettings()
    recovery: RecoverySettings = RecoverySettings()
    rate_limit: RateLimitSettings = RateLimitSettings()
    circuit_breaker: CircuitBreakerSettings = CircuitBreakerSettings()
    quotas: QuotaSettings = QuotaSettings()
    validation: ValidationSettings = ValidationSettings()
    monitoring: MonitoringSettings = MonitoringSettings()
    logging: LoggingSettings = LoggingSettings()
    features: FeatureSettings = FeatureSettings()
    experiments: dict[ExperimentName, ExperimentSettings] = {}
    api: ApiSettings = ApiSettings()
    webhooks: WebhookSettings = WebhookSettings()
