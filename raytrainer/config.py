"""Typed, validated configuration: YAML files plus dotted `--set a.b=c` overrides.

Every section is a strict pydantic model, so an unknown key, a wrong type or an inconsistent value
fails before any work starts, with a message that names the key, the value and what would be valid.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    SecretStr,
    SerializationInfo,
    ValidationError,
    model_validator,
)

PRESETS_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who wrote the config."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- secrets
#
# A credential field is typed `Secret(...)`: a pydantic SecretStr (so repr/str never show it) whose JSON
# form is a redaction note unless the dump is asked to reveal it. Everything that persists or prints a
# config goes through `to_dict`, so the type alone decides what never leaves memory.

REDACTED = "***"
REVEAL_SECRETS = "reveal_secrets"  # serialization context key


def _secret_serializer(hint: str):
    def dump(value: SecretStr, info: SerializationInfo) -> str:
        if (info.context or {}).get(REVEAL_SECRETS):
            return value.get_secret_value()
        return f"{REDACTED} (from --set/config; give it via {hint})"

    return PlainSerializer(dump, return_type=str, when_used="always")


def Secret(hint: str) -> Any:  # noqa: N802 - reads as a type in annotations
    """A credential field; `hint` says where a resumed or redacted run should take the real value from."""
    return Annotated[SecretStr, _secret_serializer(hint)]


def is_redacted(value: str | SecretStr | None) -> bool:
    """True for the note `to_dict` writes in place of a secret (so it is never mistaken for a key)."""
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    return isinstance(value, str) and value.startswith(REDACTED)


def reveal(value: str | SecretStr | None) -> str | None:
    """The plain value of a credential field (plain strings pass: `model_copy(update=...)` skips validation)."""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    return value


def _is_secret_annotation(annotation: Any) -> bool:
    return annotation is SecretStr or any(_is_secret_annotation(a) for a in get_args(annotation))


def _section_types(annotation: Any) -> list[type[BaseModel]]:
    found = [annotation] if isinstance(annotation, type) and issubclass(annotation, BaseModel) else []
    for arg in get_args(annotation):
        found += _section_types(arg)
    return found


def secret_paths(model: type[BaseModel] | None = None, prefix: str = "") -> set[str]:
    """Dotted paths of every credential field, e.g. {"checkpoint.s3.secret_access_key", ...}."""
    model = model or Config
    paths: set[str] = set()
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        if _is_secret_annotation(field.annotation):
            paths.add(path)
        for sub in _section_types(field.annotation):
            paths |= secret_paths(sub, f"{path}.")
    return paths


# --------------------------------------------------------------------------- model


class RopeScaling(Section):
    """Context extension. `linear` is position interpolation; `yarn` is NTK-by-parts + attention temperature."""

    kind: Literal["linear", "yarn"] = "linear"
    factor: float = Field(4.0, gt=1.0)
    original_max_seq_len: int = Field(2048, gt=0)
    beta_fast: float = 32.0
    beta_slow: float = 1.0


AUTO_LOSS_CHUNK_TOKENS = 1024  # model.loss.chunk_tokens=auto (chunks of 256-4,096 tokens ran alike on a CPU)


class LossConfig(Section):
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    z_loss_weight: float = Field(0.0, ge=0.0)  # PaLM's z-loss: weight * logsumexp(logits)^2
    # N: the head and the loss run N tokens at a time, each chunk's logits turned into gradients at once, and
    # the full logits never exist (raytrainer.model.fused_loss): the memory of large vocabularies and long
    # rows, and less memory traffic (faster on a CPU even at vocab 8k). 0: the logits are materialised.
    # "auto": AUTO_LOSS_CHUNK_TOKENS, and the materialised logits where the loss is computed elsewhere
    # (tensor parallel splits it by vocabulary, a pipeline computes it at its last stage) or where lm_head's
    # weight is not at hand outside lm_head (ZeRO-3)
    chunk_tokens: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"

    def tokens_per_chunk(self) -> int:
        """The chunk size the model uses when nothing else computes its loss (0: the logits materialised)."""
        return AUTO_LOSS_CHUNK_TOKENS if self.chunk_tokens == "auto" else self.chunk_tokens

    def chunked_explicitly(self) -> bool:
        """Set to a chunk size by the user: refused, not quietly turned off, where it cannot work."""
        return self.chunk_tokens not in (0, "auto")


class LoraConfig(Section):
    """Low-rank adapters on a frozen model (raytrainer.model.lora)."""

    rank: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)  # the update is scaled by alpha / rank
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1)


class MoEConfig(Section):
    """A mixture-of-experts MLP in every block (raytrainer.model.moe): each token goes to top_k of n_experts."""

    n_experts: int = Field(8, gt=1)
    top_k: int = Field(2, gt=0)
    expert_hidden: int | None = Field(None, gt=0)  # None: the dense MLP's hidden width (model.ffn_hidden rule)
    shared_experts: int = Field(0, ge=0)  # experts every token goes through, beside its routed ones
    # aux_loss: a load-balancing loss (Switch/GShard); bias: DeepSeek-V3's auxiliary-loss-free balancing, a
    # per-expert bias on the routing scores nudged after every step towards equal load
    balance: Literal["aux_loss", "bias"] = "aux_loss"
    # softmax: Switch/Mixtral scores, competing across experts; sigmoid: DeepSeek-V3's independent affinities
    # (the chosen ones renormalised), which its bias balancing was made for
    score: Literal["softmax", "sigmoid"] = "softmax"
    aux_loss_weight: float = Field(0.01, ge=0)
    bias_update_rate: float = Field(1e-3, ge=0)
    router_z_loss_weight: float = Field(1e-3, ge=0)  # ST-MoE's router z-loss: weight * logsumexp(logits)^2
    capacity_factor: float | None = Field(None, gt=0)  # None: dropless; else top_k * tokens / n_experts * this

    @model_validator(mode="after")
    def _check_top_k(self) -> MoEConfig:
        if self.top_k > self.n_experts:
            raise ValueError(f"model.moe.top_k={self.top_k} exceeds model.moe.n_experts={self.n_experts}")
        return self


class ModelConfig(Section):
    vocab_size: int = Field(50304, gt=0)
    d_model: int = Field(768, gt=0)
    n_layers: int = Field(12, gt=0)
    n_heads: int = Field(12, gt=0)
    n_kv_heads: int | None = None  # None: same as n_heads (plain multi-head attention)
    ffn_hidden: int | None = None  # None: Llama rule, 8/3 * d_model * ffn_multiplier rounded up
    ffn_multiplier: float = Field(1.0, gt=0)
    multiple_of: int = Field(256, gt=0)
    max_seq_len: int = Field(2048, gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    rope_scaling: RopeScaling | None = None
    norm_eps: float = Field(1e-5, gt=0)
    qk_norm: bool = False
    logit_softcap: float | None = Field(None, gt=0)
    tie_embeddings: bool = False
    init_std: float = Field(0.02, gt=0)
    depth_scaled_init: bool = True  # residual output projections get std / sqrt(2 * n_layers)
    mup_base_d_model: int | None = Field(None, gt=0)  # set to enable muP; width of the tuned proxy
    mtp_heads: int = Field(0, ge=0)  # extra heads predicting tokens t+2 .. t+1+mtp_heads
    mtp_weight: float = Field(0.3, ge=0)
    attention: Literal["auto", "sdpa", "flex", "flash"] = "auto"
    loss: LossConfig = LossConfig()
    bidirectional: bool = False  # every token attends to its whole document: data.objective=mlm, and only it
    # A fresh run starts from these weights (a resume loads its own checkpoint instead): hf:<dir> (Llama/Qwen3
    # safetensors) or run:<checkpoint.storage>/<run name>[@step] (another run's checkpoint)
    init_from: str | None = Field(None, pattern=r"^(hf|run):.+")
    # What a run: source gives: its weights, or its full state (optimizer, step, tokens seen; the data position
    # too when the data section is unchanged): continual pretraining, or a WSD stable phase branched into decay
    init_state: Literal["weights", "full"] = "weights"
    lora: LoraConfig | None = None  # train low-rank adapters on a frozen model (usually with init_from)
    moe: MoEConfig | None = None  # mixture-of-experts MLPs instead of dense ones

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def expert_hidden_dim(self) -> int:
        return (self.moe.expert_hidden if self.moe is not None and self.moe.expert_hidden else None) or self.hidden_dim

    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        hidden = int(8 * self.d_model / 3 * self.ffn_multiplier)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if self.d_model % self.n_heads:
            raise ValueError(
                f"model.n_heads={self.n_heads} must divide model.d_model={self.d_model}; "
                f"valid head counts: {_divisors(self.d_model)[:12]}"
            )
        if self.n_heads % self.kv_heads:
            raise ValueError(
                f"model.n_kv_heads={self.kv_heads} must divide model.n_heads={self.n_heads}; "
                f"valid: {_divisors(self.n_heads)}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head dim d_model/n_heads={self.head_dim} must be even for RoPE")
        if self.init_state == "full" and not (self.init_from or "").startswith("run:"):
            raise ValueError(f"model.init_state=full needs model.init_from=run:<storage>/<run>[@step] (now "
                             f"{self.init_from!r}): only a run's checkpoint has an optimizer and a step to go on from")
        mlp_targets = {"gate_proj", "up_proj", "down_proj"} & set(self.lora.targets if self.lora else [])
        if self.moe is not None and mlp_targets:
            raise ValueError(f"model.lora.targets={self.lora.targets} names MLP projections, which a mixture-of-"
                             "experts model (model.moe) keeps inside its experts; target attention projections")
        if self.init_state == "full" and self.lora is not None:
            raise ValueError("model.init_state=full with model.lora: the source's optimizer holds no adapter state; "
                             "use model.init_state=weights to put adapters on its weights")
        return self


# --------------------------------------------------------------------------- optimisation


class OptimConfig(Section):
    name: Literal["adamw", "adafactor"] = "adamw"
    lr: float = Field(3e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)  # global-norm clipping; None disables


class ScheduleConfig(Section):
    name: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = Field(100, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # min_lr = lr * min_lr_ratio
    decay_start: int | None = Field(None, ge=0)  # wsd: first step of the decay; None = steps - decay_steps
    decay_steps: int | None = Field(None, ge=1)  # wsd: length of the decay; None = 20% of the run
    decay_shape: Literal["linear", "cosine", "sqrt"] = "linear"  # wsd decay curve


class PrecisionConfig(Section):
    dtype: Literal["fp32", "bf16", "fp16", "fp8"] = "bf16"
    initial_loss_scale: float = Field(2.0**16, gt=0)  # fp16 only
    loss_scale_growth_interval: int = Field(2000, gt=0)
    min_loss_scale: float = Field(1.0, gt=0)


class ActivationCheckpointing(Section):
    mode: Literal["none", "full", "every_n", "selective"] = "none"
    every_n: int = Field(2, ge=1)  # mode=every_n: checkpoint every n-th block
    selective: Literal["attention", "mlp"] = "attention"  # mode=selective: what to recompute


class TrainConfig(Section):
    steps: int = Field(1000, gt=0)
    seq_len: int = Field(2048, gt=0)  # used when the curriculum does not set one
    global_batch_tokens: int = Field(524288, gt=0)  # constant across world sizes and phases
    micro_batch_size: int = Field(4, gt=0)  # at most this many rows per rank per micro-step
    seed: int = 1234
    ema_decay: float | None = Field(None, gt=0, lt=1)
    compile: bool = False
    activation_checkpointing: ActivationCheckpointing = ActivationCheckpointing()
    log_every: int = Field(10, gt=0)
    peak_flops: float | None = Field(None, gt=0)  # per device; None: known GPU by name, or measured on CPU
    threads_per_worker: int | None = Field(None, gt=0)


# --------------------------------------------------------------------------- data


_AccessKeyId = Secret("s3.credentials_file or AWS_ACCESS_KEY_ID")
_SecretAccessKey = Secret("s3.credentials_file or AWS_SECRET_ACCESS_KEY")


class S3Config(Section):
    """Where object storage lives. Unset fields fall back to the standard AWS environment/credential chain.

    Keys are best left out of the config: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in
    the environment, or `credentials_file`, keep them out of job entrypoints and shell history. The key id
    is not a secret in AWS's model, but it is typed secret too: it names the principal the secret unlocks,
    a half-redacted pair is an easier rule to get wrong, and `describe()` still shows its first characters.
    """

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: _AccessKeyId | None = None
    secret_access_key: _SecretAccessKey | None = None
    # An AWS-style INI credentials file (`[profile]` with aws_access_key_id / aws_secret_access_key), read
    # where storage is opened, so it must exist at this path on every node. Used when the keys above are unset.
    credentials_file: str | None = None
    credentials_profile: str = "default"


class Phase(Section):
    start_step: int = Field(0, ge=0)
    seq_len: int | None = Field(None, gt=0)
    source_weights: dict[str, float] = {}  # empty: every source in proportion to its tokens
    bucket_weights: dict[str, float] = {}  # length buckets by name, e.g. {"short": 3, "long": 1}
    max_doc_tokens: int | None = Field(None, gt=0)
    min_quality: float | None = None


class DataConfig(Section):
    path: str = "data/sample"  # directory (local or s3://) holding manifest.json and the shards
    # A prepared dataset of held-out text to evaluate on; None: the validation split of `path`'s manifest.
    val_path: str | None = None
    tokenizer: str = "byte"  # byte | gpt2 | path/to/tokenizer.json
    objective: Literal["clm", "fim", "mlm", "sft"] = "clm"
    fim_rate: float = Field(0.5, ge=0, le=1)
    fim_spm_rate: float = Field(0.5, ge=0, le=1)
    mlm_probability: float = Field(0.15, gt=0, lt=1)
    on_bad_shard: Literal["fail", "skip"] = "fail"
    prefetch_batches: int = Field(4, ge=0)
    # Ray Data tasks making one rank's batches at once: one task outpaces a GPU's consumption many times
    # over, and every extra one keeps its own copy of the shards it reads.
    read_tasks: int = Field(1, gt=0)
    epoch_warning: int = Field(4, gt=0)  # warn when a source is repeated past this many epochs
    shuffle_window_shards: int = Field(16, gt=0)  # an epoch shuffles documents within windows of N shards
    # A resumed run whose dataset's shards changed since it started is refused unless this is set.
    allow_manifest_change: bool = False
    phases: list[Phase] = [Phase()]
    s3: S3Config = S3Config()

    @model_validator(mode="after")
    def _check_phases(self) -> DataConfig:
        starts = [p.start_step for p in self.phases]
        if not starts or starts[0] != 0:
            raise ValueError("data.phases[0].start_step must be 0 (the first phase starts the run)")
        if starts != sorted(set(starts)):
            raise ValueError(f"data.phases start_step values must be strictly increasing, got {starts}")
        for i, p in enumerate(self.phases):
            for key, weights in (("source_weights", p.source_weights), ("bucket_weights", p.bucket_weights)):
                bad = {k: v for k, v in weights.items() if v < 0}
                if bad or (weights and sum(weights.values()) <= 0):
                    raise ValueError(f"data.phases[{i}].{key}={weights} must be non-negative with a positive sum")
        return self


# --------------------------------------------------------------------------- distribution, storage, guardian


class ParallelConfig(Section):
    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    min_workers: int = Field(1, gt=0)
    max_workers: int = Field(1, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    extra_resources: dict[str, float] = {}  # custom Ray resources per worker, e.g. {"trainer_slot": 1}
    zero_stage: Literal[1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    fsdp_reshard_after_forward: bool = True
    fsdp_cpu_offload: bool = False
    max_failures: int = Field(3, ge=-1)  # worker-group restarts before the run gives up; -1 = unlimited
    elastic_resize_interval_s: float = Field(60.0, ge=0)  # how often a healthy run looks for more capacity
    # How long the first start of a run may wait for capacity (placement) before it tries again. Once an
    # elastic run (min_workers < max_workers) has trained, its restarts and resizes wait
    # worker_restart_timeout_s instead (never longer than this) and then size the group again from the
    # nodes still alive, so a node lost abruptly costs seconds (raytrainer/elastic.py).
    worker_start_timeout_s: float = Field(600.0, gt=0)
    worker_restart_timeout_s: float = Field(30.0, gt=0)
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    # Tensor (+ sequence) parallel degree: each group of tp consecutive ranks holds one copy of the model split
    # across them and trains on the same rows; data parallelism takes the rest of the world.
    tp: int = Field(1, ge=1)
    # Expert parallel degree (a mixture-of-experts model): groups of ep data-parallel ranks split every MoE
    # layer's experts between them, tokens travelling to their experts by all-to-all.
    ep: int = Field(1, ge=1)
    # Pipeline parallel degree: the model's layers split into pp stages held by consecutive groups of tp ranks,
    # micro-batches (train.micro_batch_size rows, as many as a replica's accumulation steps) flowing through them.
    pp: int = Field(1, ge=1)
    # gpipe: every forward, then every backward (activations of every micro-batch held at once); 1f1b: one forward,
    # one backward in the steady state (at most pp micro-batches in flight); interleaved_1f1b: 1f1b over
    # pp_stages_per_rank smaller stages per rank, a smaller bubble for more messages.
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b"] = "1f1b"
    pp_stages_per_rank: int = Field(1, ge=1)
    # Context parallel degree: every row's sequence split over cp ranks (attention gathers keys and values), for
    # rows too long for one device's activations; the cp ranks of a replica train on the same rows.
    cp: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _check_range(self) -> ParallelConfig:
        if self.min_workers > self.max_workers:
            raise ValueError(
                f"parallel.min_workers={self.min_workers} exceeds parallel.max_workers={self.max_workers}"
            )
        if self.offload_params and not (self.strategy == "deepspeed" and self.zero_stage == 3):
            raise ValueError("parallel.offload_params needs parallel.strategy=deepspeed with zero_stage=3")
        for key in ("min_workers", "max_workers"):
            for group in ("tp", "ep", "pp", "cp"):
                if getattr(self, key) % getattr(self, group):
                    raise ValueError(f"parallel.{key}={getattr(self, key)} is not a multiple of parallel.{group}="
                                     f"{getattr(self, group)}: a run grows and shrinks in whole groups")
            if getattr(self, key) % self.replica_size:
                raise ValueError(f"parallel.{key}={getattr(self, key)} is not a multiple of parallel.tp x parallel.pp"
                                 f" x parallel.cp={self.replica_size}: a run grows and shrinks in whole replicas")
        if self.tp > 1 and self.strategy != "fsdp":
            raise ValueError(f"parallel.tp={self.tp} needs parallel.strategy=fsdp (now {self.strategy}): "
                             "tensor-parallel parameters are DTensors, which FSDP2 shards over the data-parallel "
                             "ranks and DDP and DeepSpeed cannot hold")
        return self

    @property
    def replica_size(self) -> int:
        """Workers holding one copy of the model between them (tensor-parallel ranks x pipeline stages x
        context-parallel ranks), all training on the same rows."""
        return self.tp * self.pp * self.cp

    @property
    def max_replicas(self) -> int:
        """The most data-parallel replicas a run has: how many ways a global batch may be split."""
        return self.max_workers // self.replica_size


class CheckpointConfig(Section):
    storage: str = "runs"  # local directory or s3://bucket/prefix; the run lives under <storage>/<run.name>
    every_steps: int | None = Field(100, gt=0)
    every_minutes: float | None = Field(None, gt=0)
    keep_last: int = Field(3, gt=0)
    keep_every: int | None = Field(None, gt=0)  # steps; checkpoints at multiples are kept for good
    async_upload: bool = True
    upload_retry_s: float = Field(300.0, ge=0)  # a failing upload is retried this long before the run restarts
    on_preemption: bool = True  # a SIGTERM or Ray's preemption notice: checkpoint the whole group at once
    mirror: str | None = None  # optional second location for every committed checkpoint
    s3: S3Config = S3Config()


class GuardianConfig(Section):
    """Detector levels are calibrated on organic spikes: bench/organic_spikes.py, see raytrainer.fault.detectors."""

    enabled: bool = True
    warmup_exempt_steps: int = Field(20, ge=0)
    baseline_window: int = Field(32, gt=2)  # healthy steps whose median is the baseline
    min_window: int = Field(16, gt=1)  # spike tests need this many healthy steps first
    spike_ratio: float = Field(2.0, gt=1)  # loss > ratio x baseline: a spike whatever the noise
    spike_zscore: float = Field(6.0, gt=0)  # ... or this many noise-sigmas above the baseline,
    spike_min_rise: float = Field(0.3, ge=0)  # ... and at least this fraction above it
    healthy_rise: float = Field(0.15, ge=0)  # a loss within this fraction of the baseline is at baseline
    window: int = Field(128, gt=1)  # steps over which anomalies are counted towards a rollback
    grad_norm_max: float = Field(50.0, gt=0)  # healthy runs reach 20 right after warmup (bench/organic_spikes.py)
    grad_norm_zscore: float = Field(6.0, gt=0)  # sigmas of log norm over `window` healthy steps
    divergence_steps: int = Field(50, gt=0)  # loss above baseline for this many consecutive steps
    divergence_margin: float = Field(0.5, ge=0)  # in loss units above the healthy baseline
    skips_before_rollback: int = Field(3, ge=0)  # anomalies within `window` before a skip turns into a rollback
    rollback_skip_batches: int = Field(8, ge=0)  # global batches skipped past the anomaly on rollback
    rollback_skip_before: int = Field(0, ge=0)  # also skip this many batches before the first anomalous one
    zscore_min_rel_std: float = Field(0.01, ge=0)  # sigma floor as a fraction of the baseline (quiet curves)
    cooldown_lr_factor: float = Field(1.0, gt=0, le=1)
    cooldown_steps: int = Field(0, ge=0)
    max_rollbacks: int = Field(3, ge=0)
    step_timeout_s: float = Field(600.0, gt=0)
    rerun: bool = True  # recompute an anomalous step before deciding: tells the data from the hardware
    rerun_tolerance: float = Field(1e-3, ge=0)  # relative: rerun values this close are the same result
    suspect_node_limit: int = Field(2, ge=0)  # transient faults on one node before it is excluded (0: never)
    straggler_factor: float = Field(1.5, gt=1)  # a rank's median own time (data wait + forwards) vs the others'
    straggler_steps: int = Field(20, gt=0)  # ... over this many steps: it is named
    straggler_exclude: bool = False  # ... and its node is excluded like a faulty one
    blame_documents: bool = True  # a reproduced loss spike: blacklist the few documents without which it is none
    blame_max_docs: int = Field(8, gt=0)  # ... at most this many
    blame_max_tokens: float = Field(0.75, gt=0, lt=1)  # ... holding at most this share of the batch's label tokens

    @model_validator(mode="after")
    def _windows_fit(self) -> GuardianConfig:
        if self.min_window > self.baseline_window:
            raise ValueError(f"guardian.min_window={self.min_window} must be <= guardian.baseline_window="
                             f"{self.baseline_window}: the baseline never holds that many steps")
        return self


class FaultInjection(Section):
    step: int = Field(ge=0)
    kind: Literal["nan_loss", "loss_spike", "shuffle_labels", "grad_explode", "grad_bitflip",
                  "slow_rank", "crash", "hang", "s3_outage", "sigterm"]
    rank: int = 0
    scale: float = 1000.0  # grad_explode: loss multiplier
    once: bool = True  # fire only the first time the step is reached (not again after a rollback)
    steps: int = Field(1, gt=0)  # slow_rank: how many consecutive steps from `step` it lasts
    seconds: float = Field(0.5, ge=0)  # slow_rank: extra time in each of those steps' forwards


class MlflowConfig(Section):
    tracking_uri: str | None = None  # None: MLflow's own default (MLFLOW_TRACKING_URI or ./mlruns)
    experiment: str = "raytrainer"


class WandbConfig(Section):
    project: str
    entity: str | None = None
    mode: Literal["online", "offline"] = "online"


class MetricsConfig(Section):
    """Rank 0 writes every step to <checkpoint.storage>/<run.name>/metrics/ (JSON lines) and tensorboard/."""

    flush_every_s: float = Field(10.0, gt=0)  # the most a killed process loses of what is past its checkpoint
    tensorboard: bool = True
    mlflow: MlflowConfig | None = None  # needs `pip install mlflow`
    wandb: WandbConfig | None = None  # needs `pip install wandb`
    report: bool = True  # write report.md and report.html into the run's storage when it ends


class EvalConfig(Section):
    """Validation loss on a fixed set of held-out batches, the same at every world size."""

    every_steps: int | None = Field(None, gt=0)  # None: no evaluation during training
    batches: int = Field(8, gt=0)  # global batches of train.micro_batch_size rows per rank-share
    rows_per_batch: int | None = Field(None, gt=0)  # None: as many rows as a training global batch


class RunConfig(Section):
    name: str = "tiny"
    address: str | None = None  # Ray cluster to join ("auto": the one `ray start` runs here); None starts a local Ray
    local_num_cpus: int = Field(8, gt=0)  # logical CPUs for a local Ray, above the core count on purpose
    # true: go on from the newest complete checkpoint of <checkpoint.storage>/<name>, if there is one.
    # false: start at step 0; when that directory already holds a run, this one is named
    # <name>-<UTC timestamp> instead (the old run is never touched) and the driver logs where it went.
    resume: bool = True
    # A run the guardian aborted is not resubmitted as it was: set this (ideally with a lower optim.lr or
    # more schedule.warmup_steps) to clear the abort and allow guardian.max_rollbacks more rollbacks.
    resume_after_abort: bool = False
    verbose: bool = False  # true: Ray's own logs and every rank's INFO lines too (`--verbose`)


# --------------------------------------------------------------------------- the whole


class Config(Section):
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    precision: PrecisionConfig = PrecisionConfig()
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()
    parallel: ParallelConfig = ParallelConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    guardian: GuardianConfig = GuardianConfig()
    faults: list[FaultInjection] = []
    metrics: MetricsConfig = MetricsConfig()
    eval: EvalConfig = EvalConfig()
    run: RunConfig = RunConfig()

    def seq_len_at(self, step: int) -> int:
        seq_len = self.train.seq_len
        for phase in self.data.phases:
            if phase.start_step <= step and phase.seq_len is not None:
                seq_len = phase.seq_len
        return seq_len

    def phase_seq_lens(self) -> list[int]:
        return sorted({self.seq_len_at(p.start_step) for p in self.data.phases} | {self.seq_len_at(0)})

    def rows_per_global_batch(self, step: int) -> int:
        return self.train.global_batch_tokens // self.seq_len_at(step)

    def accumulation_steps(self, step: int, world_size: int) -> int:
        """Micro-steps per rank. Ranks whose share is short run padding micro-batches (all labels
        ignored), so every rank takes the same number of steps and the loss, normalised by the global
        count of label tokens, is identical at any world size."""
        rows_per_rank = math.ceil(self.rows_per_global_batch(step) / world_size)
        return math.ceil(rows_per_rank / self.train.micro_batch_size)

    @model_validator(mode="after")
    def _check_consistency(self) -> Config:
        t = self.train
        if (self.model.loss.chunked_explicitly() and self.parallel.strategy == "deepspeed"
                and self.parallel.zero_stage == 3):
            raise ValueError("model.loss.chunk_tokens with ZeRO-3: the chunked loss reads lm_head's weight outside "
                             "lm_head's forward, where ZeRO-3 has not gathered it; use zero_stage 1 or 2, fsdp, or "
                             "model.loss.chunk_tokens=auto (which falls back to the materialised logits there)")
        for seq_len in self.phase_seq_lens():
            if seq_len > self.model.max_seq_len and self.model.rope_scaling is None:
                raise ValueError(
                    f"sequence length {seq_len} exceeds model.max_seq_len={self.model.max_seq_len}; "
                    "raise model.max_seq_len or set model.rope_scaling"
                )
            if t.global_batch_tokens % seq_len:
                raise ValueError(
                    f"train.global_batch_tokens={t.global_batch_tokens} must be a multiple of every "
                    f"sequence length in use ({seq_len})"
                )
            rows = t.global_batch_tokens // seq_len
            if rows < self.parallel.max_replicas:
                raise ValueError(
                    f"global batch of {rows} rows (train.global_batch_tokens={t.global_batch_tokens} / "
                    f"seq_len {seq_len}) is smaller than parallel.max_workers={self.parallel.max_workers}"
                    + (f" / parallel.tp={self.parallel.tp}" if self.parallel.tp > 1 else "")
                    + (f" / parallel.pp={self.parallel.pp}" if self.parallel.pp > 1 else "")
                    + (f" / parallel.cp={self.parallel.cp}" if self.parallel.cp > 1 else "")
                    + "; every data-parallel replica needs at least one row"
                )
        for f in self.faults:
            if f.step >= t.steps:
                raise ValueError(f"faults: injection at step {f.step} is past train.steps={t.steps}")
        self._check_tensor_parallel()
        self._check_expert_parallel()
        self._check_pipeline_parallel()
        self._check_context_parallel()
        mlm = self.data.objective == "mlm"
        if mlm != self.model.bidirectional:
            raise ValueError(
                "data.objective=mlm needs model.bidirectional=true (a causal model would predict a masked token "
                "from its left context only)" if mlm else
                f"model.bidirectional=true lets every token see the tokens after it, so only data.objective=mlm "
                f"can train it (data.objective={self.data.objective})")
        if mlm and self.model.mtp_heads:
            raise ValueError(f"model.mtp_heads={self.model.mtp_heads} predicts the tokens after the next one, which "
                             "a bidirectional (data.objective=mlm) model already sees; set model.mtp_heads=0")
        return self


    def _check_expert_parallel(self) -> None:
        ep, m = self.parallel.ep, self.model
        if ep == 1:
            return
        if m.moe is None:
            raise ValueError(f"parallel.ep={ep} splits the experts of a mixture-of-experts model; set model.moe")
        if m.moe.n_experts % ep:
            raise ValueError(f"model.moe.n_experts={m.moe.n_experts} is not divisible by parallel.ep={ep}: each "
                             f"rank holds an equal share; valid ep: {[d for d in _divisors(m.moe.n_experts) if d > 1]}")
        if self.parallel.strategy != "ddp" or self.parallel.tp > 1:
            raise ValueError(f"parallel.ep={ep} works with parallel.strategy=ddp and parallel.tp=1 for now (now "
                             f"{self.parallel.strategy}, tp={self.parallel.tp})")

    def _check_tensor_parallel(self) -> None:
        tp, m = self.parallel.tp, self.model
        if tp == 1:
            return
        for key, value in (("n_heads", m.n_heads), ("n_kv_heads", m.kv_heads), ("vocab_size", m.vocab_size)):
            if value % tp:
                raise ValueError(f"model.{key}={value} is not divisible by parallel.tp={tp}: each tensor-parallel rank "
                                 f"holds an equal share; valid tp: {[d for d in _divisors(value) if d > 1][:8]}")
        unsupported = {
            "model.mtp_heads": m.mtp_heads > 0,
            "model.loss.chunk_tokens": m.loss.chunked_explicitly(),
            "model.lora": m.lora is not None,
            "precision.dtype=fp8": self.precision.dtype == "fp8",
            "model.moe": m.moe is not None,
        }
        for key, used in unsupported.items():
            if used:
                raise ValueError(f"{key} with parallel.tp={tp} is not supported yet: turn one of them off")


    def _check_pipeline_parallel(self) -> None:
        p, m = self.parallel, self.model
        stages = p.pp * p.pp_stages_per_rank
        if p.pp_stages_per_rank > 1 and p.pp_schedule != "interleaved_1f1b":
            raise ValueError(f"parallel.pp_stages_per_rank={p.pp_stages_per_rank} needs parallel.pp_schedule="
                             f"interleaved_1f1b (now {p.pp_schedule}): only it runs several stages per rank")
        if p.pp == 1:
            return
        if p.pp_schedule == "interleaved_1f1b" and p.pp_stages_per_rank < 2:
            raise ValueError("parallel.pp_schedule=interleaved_1f1b needs parallel.pp_stages_per_rank >= 2 (stages "
                             "per rank); with one, use parallel.pp_schedule=1f1b")
        if m.n_layers % stages:
            raise ValueError(f"model.n_layers={m.n_layers} does not split into parallel.pp x "
                             f"parallel.pp_stages_per_rank={stages} stages of equal depth; valid pp x stages per rank: "
                             f"{[d for d in _divisors(m.n_layers) if d > 1]}")
        unsupported = {
            "model.tie_embeddings": m.tie_embeddings,  # the embedding is on the first stage, lm_head on the last
            "model.mtp_heads": m.mtp_heads > 0,
            "model.loss.chunk_tokens": m.loss.chunked_explicitly(),
            "model.moe": m.moe is not None,
            "model.lora": m.lora is not None,
            "parallel.ep": p.ep > 1,
            "parallel.strategy=deepspeed": p.strategy == "deepspeed",
            "precision.dtype=fp16": self.precision.dtype == "fp16",
        }
        for key, used in unsupported.items():
            if used:
                raise ValueError(f"{key} with parallel.pp={p.pp} is not supported yet: turn one of them off "
                                 "(pipeline parallel runs with parallel.strategy=ddp or fsdp over the replicas)")
        for f in self.faults:
            stage = f.rank // p.tp % p.pp
            if f.kind in ("nan_loss", "grad_explode", "slow_rank") and stage != p.pp - 1:
                raise ValueError(f"faults: {f.kind} at step {f.step} on rank {f.rank}, which holds pipeline stage "
                                 f"{stage}; with parallel.pp={p.pp} it works through the loss, on the last stage's "
                                 f"ranks ({(p.pp - 1) * p.tp}, {(p.pp - 1) * p.tp + p.replica_size}, ...)")
        starts = {0, *(phase.start_step for phase in self.data.phases)}
        # every micro-batch count a replica can take: any number of replicas an elastic run may have, every phase
        counts = {self.accumulation_steps(start, replicas) for start in starts
                  for replicas in range(max(1, p.min_workers // p.replica_size), p.max_replicas + 1)}
        if p.pp_schedule == "interleaved_1f1b":
            for m in sorted(counts):
                rounds = max(1, m // p.pp)
                if m % rounds:
                    raise ValueError(f"parallel.pp_schedule=interleaved_1f1b runs micro-batches in rounds of "
                                     f"parallel.pp={p.pp}; a replica would take {m} per step, not a multiple of "
                                     f"{rounds} rounds: change train.micro_batch_size or train.global_batch_tokens, or "
                                     "use parallel.pp_schedule=1f1b")
        if p.pp_schedule != "gpipe":
            fewest = min(counts)  # every replica present, the shortest rows
            if fewest < p.pp:
                raise ValueError(f"parallel.pp_schedule={p.pp_schedule} needs at least parallel.pp={p.pp} "
                                 f"micro-batches per step, but a replica takes {fewest} in some phase "
                                 "(train.global_batch_tokens / seq_len / replicas / train.micro_batch_size): lower "
                                 "train.micro_batch_size, raise "
                                 "train.global_batch_tokens, or use parallel.pp_schedule=gpipe")


    def _check_context_parallel(self) -> None:
        p, m = self.parallel, self.model
        if p.cp == 1:
            return
        for seq_len in self.phase_seq_lens():
            if seq_len % (2 * p.cp):
                raise ValueError(f"sequence length {seq_len} does not split into 2 x parallel.cp={p.cp} equal chunks "
                                 "(each rank holds two, for causal balance): choose lengths divisible by "
                                 f"{2 * p.cp}")
        unsupported = {
            "parallel.tp": p.tp > 1,
            "parallel.pp": p.pp > 1,
            "parallel.ep": p.ep > 1,
            f"parallel.strategy={p.strategy}": p.strategy != "ddp",
            "model.mtp_heads": m.mtp_heads > 0,
            "model.moe": m.moe is not None,
        }
        for key, used in unsupported.items():
            if used:
                raise ValueError(f"{key} with parallel.cp={p.cp} is not supported yet: turn one of them off "
                                 "(context parallel runs with parallel.strategy=ddp over every rank)")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# --------------------------------------------------------------------------- loading


def _parse_value(text: str) -> Any:
    """`--set` values are YAML scalars or flow collections: 3e-4, true, null, [512, 2048], {web: 1}."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _redact_override(item: str, secrets: set[str]) -> str:
    key = item.split("=", 1)[0]
    return f"{key}={REDACTED}" if key.strip() in secrets else item


def apply_override(raw: dict, dotted: str, value: Any) -> None:
    node = raw
    keys = dotted.split(".")
    for depth, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            node = node[int(key)]
            continue
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict | list):
            shown = REDACTED if ".".join(keys[: depth + 1]) in secret_paths() else repr(child)
            raise ConfigError(f"--set {dotted}: '{key}' is a value ({shown}), not a section")
        node = child
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    secrets = secret_paths()
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if key in secrets:
            lines.append(f"  {key}: {msg} (value not shown: it is a credential)")
        elif e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (check the spelling; see raytrainer/config.py for valid keys)")
        elif "input" in e and e["type"] != "value_error" and not isinstance(e["input"], dict):
            lines.append(f"  {key} = {e['input']!r}: {msg}")
        else:
            lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A path, or a preset name from configs/ (`tiny`, `llama-1b`, ...)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    preset = PRESETS_DIR / f"{name_or_path}.yaml"
    if preset.exists():
        return preset
    presets = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
    raise ConfigError(f"config file {name_or_path} not found (and not a preset; presets: {presets})")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or preset name) and apply `key.sub=value` overrides, validating everything."""
    raw: dict = {}
    source = "defaults"
    if path is not None:
        file = resolve_config_path(path)
        source = str(file)
        try:
            raw = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{file}: not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{file}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return config_from_dict(raw, overrides, source)


def config_from_dict(raw: dict, overrides: list[str] | None = None, source: str = "a config") -> Config:
    """A config from its dict form (e.g. the one a checkpoint holds) with `key.sub=value` overrides, validated;
    `source` names where the dict came from in errors."""
    raw = yaml.safe_load(yaml.safe_dump(raw))  # a deep copy: overrides must not change the caller's dict
    secrets = secret_paths()
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {_redact_override(item, secrets)!r}: expected key=value, "
                              "e.g. --set optim.lr=3e-4")
        key, text = item.split("=", 1)
        # A key is text as typed: YAML would turn 0123 or 1e5 into a number and change the secret.
        apply_override(raw, key.strip(), text if key.strip() in secrets else _parse_value(text))
    if overrides:
        source += " + --set " + " ".join(_redact_override(item, secrets) for item in overrides)
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def to_dict(cfg: BaseModel, reveal_secrets: bool = False) -> dict:
    """The config as JSON-ready data, credentials redacted: for everything persisted or printed.

    `reveal_secrets=True` is only for in-memory hand-overs to this run's own processes; `Config.model_validate`
    of that dict gives back the same secrets."""
    return cfg.model_dump(mode="json", context={REVEAL_SECRETS: reveal_secrets})


def secret_values(cfg: Config) -> dict[str, str]:
    """The credentials that are set, by dotted path: what `with_secrets` puts back into a redacted dict."""
    values = {}
    for path in sorted(secret_paths()):
        node: Any = cfg
        for key in path.split("."):
            node = getattr(node, key, None)
        if node is not None:
            values[path] = reveal(node)
    return values


def with_secrets(data: dict, values: dict[str, str]) -> dict:
    """A copy of `to_dict` output with the given credentials in place of their redaction notes."""
    out = yaml.safe_load(yaml.safe_dump(data))  # a deep copy of plain JSON data
    for path, value in values.items():
        apply_override(out, path, value)
    return out
