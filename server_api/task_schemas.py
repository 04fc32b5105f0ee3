"""The body of ``POST /v1/tasks``: a task and its round policy (aggregation defences, secure aggregation,
differential privacy, the release gate), validated as a whole before anything is stored."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, GetJsonSchemaHandler, model_validator
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from facefl.algorithms import registry
from facefl.compression import UpdateEncoding
from server_api.round_policy import max_assignments
from server_api.schemas import Algorithm, Architecture, Id, Strict, document_text


class RobustAggregation(Strict):
    """Server-side defences against outlier updates (facefl.algorithms.robust); off when absent.

    clip_norm scales every update down to this global L2 norm before aggregation (unlike the policy's
    update_norm_bound, which refuses larger ones); trim_fraction > 0 replaces the weighted mean with an
    unweighted coordinate-wise trimmed mean that drops floor(trim_fraction * reports) values at each end.
    """

    clip_norm: Annotated[float | None, Field(gt=0, le=1e12)] = None
    trim_fraction: Annotated[float, Field(ge=0, lt=0.5)] = 0.0


class SecureAggregation(Strict):
    """Secure aggregation (facefl.secagg, docs/privacy.md): the server learns only the cohort's weighted sum
    of updates and its total weight. Devices clip their delta to ``clip_norm`` (the server can no longer);
    each stage of the protocol after the key advertisement lasts at most ``stage_timeout_s``; cohorts
    larger than ``max_neighbours + 1`` share with a random ``max_neighbours``-regular graph (rounded down
    to even; at most 48, so that a device's encrypted shares fit the 8 KiB body limit)."""

    clip_norm: Annotated[float, Field(gt=0, le=1e6)]
    stage_timeout_s: Annotated[float, Field(gt=0, le=24 * 3600)] = 60.0
    max_neighbours: Annotated[int, Field(ge=2, le=48)] = 32


class DifferentialPrivacy(Strict):
    """DP-FedAvg (McMahan et al., 2018; facefl.privacy): each update is clipped to L2 norm clip_norm, the
    clipped updates are summed with equal weight, Gaussian noise N(0, (noise_multiplier * clip_norm)^2) is
    added to the sum (by the server; by the devices under secure aggregation), and the sum is divided by
    the number of reports. The accountant assumes each of the ``population`` devices takes part in a
    round with probability target_reports / population. noise_multiplier 0: clipping only (epsilon is
    infinite, reported as null). With epsilon_budget, no round opens once the next one would spend more.
    """

    clip_norm: Annotated[float, Field(gt=0, le=1e12)]
    noise_multiplier: Annotated[float, Field(ge=0, le=1e6)]
    delta: Annotated[float, Field(gt=0, lt=0.1)] = 1e-5
    population: Annotated[int, Field(ge=1, le=10**12)]
    epsilon_budget: Annotated[float | None, Field(gt=0, le=1e6)] = None

    @model_validator(mode="after")
    def _budget_needs_noise(self) -> DifferentialPrivacy:
        if self.epsilon_budget is not None and self.noise_multiplier == 0:
            raise ValueError("epsilon_budget needs noise_multiplier > 0: without noise epsilon is infinite")
        return self


#: Default cap on the weight (``num_samples``) one update may claim: a phone holds tens to hundreds of
#: enrolled face images, so an honest device stays below it, while a device claiming 10^9 cannot take
#: the whole weighted mean.
DEFAULT_MAX_SAMPLE_WEIGHT = 1000


# keys of the server's evaluation report (facefl.metrics.verification_report) where higher is better
GateMetric = Literal["accuracy", "auc", "tar@far=1e-2", "tar@far=1e-3"]


class ReleaseGate(Strict):
    """A new version is served only if ``metric`` on the task's eval_set is at most ``max_drop`` below the
    served version's and the task's first version's; otherwise it is recorded (with its metrics) but held
    back."""

    metric: GateMetric = "accuracy"
    max_drop: Annotated[float, Field(ge=0, le=1)] = 0.0


class RoundPolicy(Strict):
    target_reports: Annotated[int, Field(ge=1, le=100_000)] = 10
    over_selection: Annotated[float, Field(ge=1.0, le=10.0)] = 1.3
    min_reports: Annotated[int | None, Field(ge=1, le=100_000)] = None
    round_timeout_s: Annotated[float, Field(gt=0, le=7 * 24 * 3600)] = 600.0
    # Updates whose L2 norm exceeds this are refused (422). Absent or null: the architecture's default
    # (the L2 norm of its freshly initialised weights, resolved at task creation and stored); "off"
    # disables the bound explicitly.
    update_norm_bound: Annotated[float, Field(gt=0, le=1e12)] | Literal["off"] | None = None
    # num_samples above this is counted as this much weight in the weighted mean
    max_sample_weight: Annotated[int, Field(ge=1, le=1_000_000_000)] = DEFAULT_MAX_SAMPLE_WEIGHT
    robust: RobustAggregation | None = None
    gate: ReleaseGate | None = None
    # differential privacy (DP-FedAvg): clipping, noise and the (epsilon, delta) accountant; off when null
    dp: DifferentialPrivacy | None = None
    # how devices encode their delta (facefl.compression): float32, float16, or int8 with a scale per
    # tensor ("int8") or per output channel ("int8_channel"); the server accepts every encoding whatever
    # the task asks. error feedback: devices add what quantization dropped to their next delta
    update_encoding: UpdateEncoding = "float32"
    update_error_feedback: bool = False
    secure_aggregation: SecureAggregation | None = None

    @model_validator(mode="after")
    def _defaults(self) -> RoundPolicy:
        if self.min_reports is None:
            self.min_reports = max(1, self.target_reports // 2)
        if self.min_reports > self.target_reports:
            raise ValueError("min_reports must not exceed target_reports")
        if self.secure_aggregation is not None:
            if self.robust is not None:
                raise ValueError(
                    "policy.secure_aggregation cannot be combined with policy.robust: clipping and "
                    "trimmed means on the server need the individual updates secure aggregation hides"
                )
            if self.min_reports < 2:
                raise ValueError(
                    "policy.secure_aggregation needs min_reports >= 2: a sum of one is one update"
                )
            if self.update_encoding != "float32" or self.update_error_feedback:
                raise ValueError(
                    "policy.secure_aggregation quantizes updates itself: update_encoding must stay float32 "
                    "and update_error_feedback false"
                )
            if max_assignments(self.target_reports, self.over_selection) * self.max_sample_weight >= 2**31:
                raise ValueError(
                    "policy.secure_aggregation: devices x max_sample_weight must stay below 2^31 (the total "
                    "weight is summed in 32-bit integers)"
                )
        if self.robust is not None and 0 < self.robust.trim_fraction * self.min_reports < 1:
            raise ValueError(
                "robust.trim_fraction * min_reports < 1: a round at the minimum would trim nothing"
            )
        if self.dp is not None:
            if self.dp.population < self.target_reports:
                raise ValueError(
                    "policy.dp.population must be at least target_reports (q = target / population)"
                )
            if self.robust is not None:
                # DP's sensitivity analysis is for a sum of clipped updates; the trimmed mean is not a sum,
                # and robust.clip_norm would be a second clip next to dp.clip_norm
                raise ValueError(
                    "policy.dp cannot be combined with policy.robust: policy.dp clips every update"
                )
        return self


class TaskIn(Strict):
    name: Annotated[str, Field(min_length=1, max_length=128)]
    algorithm: Algorithm = registry.DEFAULT
    architecture: Architecture = "small"
    embedding_dim: Annotated[int | None, Field(ge=8, le=4096)] = None
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0
    rounds: Annotated[int, Field(ge=1, le=100_000)] = 10
    initial_version: Id | None = None
    eval_set: Annotated[str | None, Field(min_length=1, max_length=64)] = None
    # parameter groups of the architecture that train on the device (None: the whole model)
    trainable: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=64)]] | None, Field(min_length=1, max_length=64)
    ] = None
    # validated by the chosen algorithm's own model (facefl.algorithms), then stored as its full dump:
    # a 422 names the field, and a field of another algorithm says which one it belongs to. The OpenAPI
    # document gives each algorithm's model (see __get_pydantic_json_schema__)
    hyperparams: dict[str, Any] = Field(
        default_factory=dict,
        description="the chosen algorithm's hyper-parameters: one of the *Hyperparams schemas, by algorithm",
    )
    policy: RoundPolicy = Field(default_factory=RoundPolicy)

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        """TaskIn's schema plus one ``oneOf`` branch per registry algorithm: that ``algorithm`` with its
        own hyper-parameter model (a component schema each). Only the default algorithm's branch
        matches a body without ``algorithm``, so exactly one branch matches every valid body."""
        schema = handler(core_schema)
        branches = []
        for algorithm in registry.ALGORITHMS.values():
            ref = handler(algorithm.hyperparams.__pydantic_core_schema__)
            document_text(handler.resolve_ref_schema(ref))
            branch: dict[str, Any] = {
                "title": algorithm.name,
                "properties": {"algorithm": {"const": algorithm.name}, "hyperparams": ref},
            }
            if algorithm.name != registry.DEFAULT:
                branch["required"] = ["algorithm"]
            branches.append(branch)
        handler.resolve_ref_schema(schema)["oneOf"] = branches
        return schema

    @model_validator(mode="after")
    def _check(self) -> TaskIn:
        self.hyperparams = registry.task_hyperparams(self.algorithm, self.hyperparams).model_dump()
        if self.policy.dp is not None and not registry.get(self.algorithm).updates_only_summed:
            raise ValueError(
                f"policy.dp needs an algorithm whose updates the server only sums; {self.algorithm} "
                "uploads per-device tensors"
            )
        if self.policy.gate is not None and self.eval_set is None:
            raise ValueError("policy.gate needs eval_set: the gate compares versions on it")
        if self.trainable is not None:
            self.trainable = list(dict.fromkeys(self.trainable))  # each group once, in the given order
        if (
            self.policy.secure_aggregation is not None
            and not registry.get(self.algorithm).updates_only_summed
        ):
            raise ValueError(
                f"policy.secure_aggregation is not available for {self.algorithm}: its server needs each "
                "device's update, not only their sum"
            )
        return self
