"""The config resolved once into each stage's typed settings (workflow/rules/common.smk).

Methods resolve through the registry (crce.methods): a method's settings are its config
section's keys (`train` for the methods the engine trains, `uce` for UCE) that its class
reads, overridden by its own entry's keys. No torch is imported here.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

from pydantic import BaseModel, ValidationError

from . import methods as registry
from .constants import LIST_LENGTH, N_TEST, N_TRAIN
from .methods import Kind, Method, MethodSettings
from .settings import (
    AttackSettings,
    AuditSettings,
    FeatureRuntime,
    FeatureSettings,
    JudgeRuntime,
    JudgeSettings,
    ListSettings,
    LlmRuntime,
    QualitySettings,
    RobustnessSettings,
    SampleRuntime,
    SampleSettings,
    SplitSettings,
    SweepSettings,
    TrainRuntime,
)


class SettingsError(ValueError):
    """A setting that cannot be resolved; the message names the method and key."""


def split_known(model: type[BaseModel], section: dict) -> tuple[dict, dict]:
    """A config section's keys of `model`, and the rest."""
    known = {k: v for k, v in section.items() if k in model.model_fields}
    return known, {k: v for k, v in section.items() if k not in known}


def _errors(err: ValidationError) -> str:
    """A validation error in one line, each problem with the value it got."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']} (got {e['input']!r})"
        for e in err.errors()[:5]
    )


@dataclass(frozen=True)
class ResolvedMethod:
    """A configured method: its name, Table 1 label, class and settings."""

    name: str
    label: str
    cls: type[Method]
    settings: MethodSettings

    @property
    def kind(self) -> Kind:
        return self.cls.kind

    @property
    def trains(self) -> bool:
        """It has an erase job (every kind but the base model and inference-time methods)."""
        return self.kind not in (Kind.NONE, Kind.INFERENCE)

    @property
    def changes_sampling(self) -> bool:
        return self.cls.sampling.__func__ is not Method.sampling.__func__

    @property
    def iterative(self) -> bool:
        return self.kind is Kind.ITERATIVE

    def params(self) -> dict:
        return self.settings.as_params()

    def group_key(self) -> tuple | None:
        return self.cls.group_key(self.settings) if self.iterative else None

    def source_sha256(self) -> str | None:
        return registry.source_sha256(self.settings.strategy)


def drop_left_out_methods(config: dict) -> list[str]:
    """Remove the method entries set to null and name them: Snakemake merges an overlay key by
    key, so `methods: {realera: null}` is how an overlay leaves a method out of the study."""
    left_out = [name for name, spec in config.get("methods", {}).items() if spec is None]
    for name in left_out:
        del config["methods"][name]
    return left_out


def resolve_method(name: str, spec: dict, sections: dict) -> ResolvedMethod:
    """A method's settings: the keys its class reads from its config section, overridden by
    its own entry's keys (a nested dict, e.g. `sphere`, merges key by key)."""
    where = f"methods.{name}"
    strategy = spec.get("strategy")
    if not isinstance(strategy, str):
        raise SettingsError(f"{where}: needs a `strategy`")
    try:
        cls = registry.load(strategy)
    except registry.MethodError as err:
        raise SettingsError(f"{where}.strategy: {err}") from None
    own = {k: v for k, v in spec.items() if k != "label"}
    fields = cls.Settings.model_fields
    unknown = sorted(set(own) - set(fields))
    if unknown:
        known = ", ".join(k for k in fields if k != "strategy") or "none"
        raise SettingsError(
            f"{where}: unknown key(s) {', '.join(unknown)} for strategy {strategy!r} "
            f"(its keys: {known})"
        )
    section = sections.get(cls.section, {}) if cls.section else {}
    merged = {k: section[k] for k in cls.section_keys() if k in section}
    for key, value in own.items():
        nested = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = {**merged[key], **value} if nested else value
    try:
        settings = cls.Settings(**merged)
    except ValidationError as err:
        raise SettingsError(f"{where}: {_errors(err)}") from None
    bound = (sections.get("train") or {}).get("max_iterations")
    if bound:  # train.max_iterations
        settings = cls.bounded(settings, bound)
    return ResolvedMethod(name, spec.get("label", name), cls, settings)


def training_groups(trained: dict[str, ResolvedMethod], enabled: bool) -> list[str]:
    """Methods that train as one batched job per concept: the largest set of methods with the
    same group key (two or more), the rest on their own; [] when no two methods can share."""
    if not enabled:
        return []
    by_key: dict[tuple, list[str]] = {}
    for name, method in trained.items():
        key = method.group_key()
        if key is not None:
            by_key.setdefault(key, []).append(name)
    largest = max(by_key.values(), key=len, default=[])
    return largest if len(largest) > 1 else []


class Sweep:
    """Paper Table 6: one method's settings at every (M, N) of a grid, on the concepts of some
    categories. A cell whose settings equal the method's own is that method (its Table 1 job,
    not a second training); the others are the sweep's own methods, never in Table 1."""

    def __init__(self, sweep: dict | None, trained: dict[str, ResolvedMethod], n_train: int):
        self.cells: dict[tuple[int, int], str] = {}
        self.trained: dict[str, ResolvedMethod] = {}
        self.categories: list[str] = []
        if not sweep:
            return
        settings = SweepSettings(**sweep)
        self.categories = list(settings.categories)
        name = settings.method
        base = trained.get(name)
        fields = base.cls.Settings.model_fields if base else {}
        if not base or "n_corefs" not in fields or "n_retains" not in fields:
            raise SettingsError(
                f"sweep.method {name!r} must be a method that draws M corefs and N retains "
                "(strategy crce, sphere or realera)"
            )
        for m in settings.n_corefs:
            for n in settings.n_retains:
                if max(m, n) > n_train:
                    raise SettingsError(
                        f"sweep: M={m}, N={n} draw more items than the train split has "
                        f"(split.n_train={n_train})"
                    )
                cell = base.settings.model_copy(update={"n_corefs": m, "n_retains": n})
                cell_name = name if cell == base.settings else f"{name}-m{m}-n{n}"
                self.cells[(m, n)] = cell_name
                if cell_name != name:
                    self.trained[cell_name] = ResolvedMethod(cell_name, cell_name, base.cls, cell)


class Study:
    """The config resolved once into each stage's settings (common.smk)."""

    def __init__(self, config: dict):
        self.seed = config["seed"]
        self.model = config["model"]["pretrained"]
        self.model_build = config["model"].get("build")  # a builder: small worlds
        self.methods = {
            name: resolve_method(name, spec, config) for name, spec in config["methods"].items()
        }
        self.labels = {m: method.label for m, method in self.methods.items()}
        runtime, _ = split_known(TrainRuntime, config.get("train", {}))
        self.train_runtime = TrainRuntime(**runtime)
        self.trained = {name: m for name, m in self.methods.items() if m.trains}
        self.split = SplitSettings(seed=self.seed, **config["split"])
        llm, corefs = config["llm"], config["corefs"]
        self.lists = ListSettings(**corefs, **split_known(ListSettings, llm)[0])
        self.check_split()
        self.sweep = Sweep(config.get("sweep"), self.trained, self.split.n_train)
        # train.group_methods: one erase job per concept trains Table 1's group, another the
        # sweep's cells (crce.erase); the rest train one method per job. Without a Table 1
        # group the sweep's cells train one per job too (erase_sweep reuses erase_group).
        self.grouped = training_groups(self.trained, self.train_runtime.group_methods)
        self.sweep_grouped = (
            training_groups(self.sweep.trained, self.train_runtime.group_methods)
            if self.grouped
            else []
        )
        self.all_trained = {**self.trained, **self.sweep.trained}
        grouped = set(self.grouped) | set(self.sweep_grouped)
        self.solo = [m for m in self.all_trained if m not in grouped]
        self.llm_runtime = LlmRuntime(**split_known(LlmRuntime, llm)[0])
        self.sample = SampleSettings(**split_known(SampleSettings, config["sample"])[0])
        self.sample_runtime = SampleRuntime(**split_known(SampleRuntime, config["sample"])[0])
        self.judge = JudgeSettings(**split_known(JudgeSettings, config["judge"])[0])
        self.judge_runtime = JudgeRuntime(**split_known(JudgeRuntime, config["judge"])[0])
        features = config.get("features", {})
        self.features = FeatureSettings(**split_known(FeatureSettings, features)[0])
        self.features_runtime = FeatureRuntime(**split_known(FeatureRuntime, features)[0])
        self.features_build = features.get("build")  # a builder: the test world's tiny CLIP
        self.quality = QualitySettings(**config["quality"]) if "quality" in config else None
        self.robustness = RobustnessSettings(**config.get("robustness", {}))
        self.audit = AuditSettings(**config.get("audit", {}))
        self.attacks = AttackSettings(**config.get("attacks", {}))
        self.check_attacks()

    def check_split(self) -> None:
        """Contradictions the config alone decides, refused before any job: a split larger
        than a list, a method that draws more than a train split holds."""
        split = self.split
        if split.n_train + split.n_test > LIST_LENGTH:
            raise SettingsError(
                f"split.n_train + split.n_test = {split.n_train} + {split.n_test} = "
                f"{split.n_train + split.n_test}: more than the {LIST_LENGTH} items of a list"
            )
        # The dataset's concepts keep its own 10/5 split; the LLM's follow split.n_train.
        n_train = min(split.n_train, N_TRAIN) if self.lists.dataset else split.n_train
        for name, method in self.trained.items():
            problems = method.cls.config_problems(method.settings, n_train=n_train)
            if problems:
                where = "split.n_train" + (" and the dataset's split" if self.lists.dataset else "")
                raise SettingsError(f"methods.{name}: {'; '.join(problems)} ({where})")

    def check_attacks(self) -> None:
        """An attack reads Table 1's images (pre-ASR) and the concept's test prompts."""
        attacks = self.attacks
        if attacks.images_per_prompt > self.sample.images_per_prompt:
            raise SettingsError(
                f"attacks.images_per_prompt = {attacks.images_per_prompt}: more than the "
                f"{self.sample.images_per_prompt} images per prompt of sample.images_per_prompt "
                "(an attack's unattacked images are Table 1's)"
            )
        n_test = min(self.split.n_test, N_TEST) if self.lists.dataset else self.split.n_test
        if attacks.ring_a_bell and attacks.ring_a_bell.n_base > 1 + n_test:
            raise SettingsError(
                f"attacks.ring_a_bell.n_base = {attacks.ring_a_bell.n_base}: a concept has "
                f"{1 + n_test} base prompts (its own and split.n_test = {n_test} test corefs)"
            )
        uda = attacks.unlearndiffatk
        if uda.concepts and self.base_method is None:
            raise SettingsError(
                "attacks.unlearndiffatk.concepts: UnlearnDiffAtk attacks the base model's images "
                "of the prompts, and no method is the base model (strategy: none)"
            )
        unknown = [m for m in uda.methods or [] if m not in self.methods]
        if unknown:
            raise SettingsError(
                f"attacks.unlearndiffatk.methods: {', '.join(unknown)} not in methods "
                f"(they are: {', '.join(self.methods)})"
            )

    @property
    def base_method(self) -> str | None:
        """The method that is the base model (its images are UnlearnDiffAtk's x0)."""
        return next((m for m, r in self.methods.items() if r.kind is Kind.NONE), None)

    def uda_methods(self) -> list[str]:
        """The methods UnlearnDiffAtk attacks: those named, else every one but the base model."""
        named = self.attacks.unlearndiffatk.methods
        return [m for m in self.methods if m in named] if named is not None else [
            m for m in self.methods if m != self.base_method
        ]  # fmt: skip

    def uda_concepts(self, concepts: dict) -> list[str]:
        """The concept ids UnlearnDiffAtk attacks: each entry a concept id or a category."""
        chosen = []
        for entry in self.attacks.unlearndiffatk.concepts:
            ids = [c for c, concept in concepts.items() if entry in (c, concept.category)]
            if not ids:
                raise SettingsError(
                    f"attacks.unlearndiffatk.concepts: {entry!r} is neither a concept id of the "
                    f"sheet nor a category of its concepts ({', '.join(sorted(concepts))})"
                )
            chosen += [c for c in ids if c not in chosen]
        return chosen

    # -- what the rules ask of a method -----------------------------------------------------
    def erase_params(self, methods: list[str]) -> dict:
        """The settings of the methods one erase job trains, by name."""
        return {m: self.all_trained[m].params() for m in methods}

    def sources(self, methods: list[str]):
        """The source digest of each method defined in your own file (a param, so editing the
        file reruns its jobs); untracked (a namespace) when every method is built in."""
        digests = {m: self.all_trained[m].source_sha256() for m in methods}
        digests = {m: d for m, d in digests.items() if d}
        return digests or SimpleNamespace()

    def sampling(self, method: str, concept: dict):
        """What the sampler needs to apply a method's change at sampling time (its settings,
        source digest, the concept, its split when it reads it), a tracked param; untracked (a
        namespace) for a method that samples like the base model with its delta."""
        resolved = self.methods.get(method) or self.all_trained.get(method)
        if resolved is None or not resolved.changes_sampling:
            return SimpleNamespace()
        params = {"settings": resolved.params(), "source_sha256": resolved.source_sha256(),
                  "concept": concept}  # fmt: skip
        if resolved.cls.sampling_reads_split(resolved.settings):
            params["split"] = f"results/splits/{concept['id']}.json"
        return params

    def sampling_inputs(self, method: str, concept_id: str) -> list[str]:
        """The split, for a method whose sampling reads it (its sample jobs wait for it)."""
        resolved = self.methods.get(method) or self.all_trained.get(method)
        if resolved is None or not resolved.cls.sampling_reads_split(resolved.settings):
            return []
        return [f"results/splits/{concept_id}.json"]

    def reference_sets(self, methods: list[str], concept: dict) -> dict[str, str]:
        """The image sets one erase job's methods train on (`Method.references`): the name
        each gives a set -> its key (`results/references/{key}/`). One name for two different
        sets in one job is refused: the engine hands the job one `references` dict."""
        sets: dict[str, str] = {}
        for name in methods:
            for request, key, _ in self._references(self.all_trained[name], concept):
                if sets.setdefault(request.name, key) != key:
                    raise SettingsError(
                        f"methods {', '.join(methods)} train in one job on {concept['id']} and "
                        f"ask for two different image sets named {request.name!r}"
                    )
        return sets

    def reference_requests(self, concepts: list[dict]) -> dict[str, dict]:
        """Every image set any method asks for on any concept: key -> what decides it (the
        `reference_images` rule's params), each drawn once however many ask."""
        found = {}
        for method in self.all_trained.values():
            for concept in concepts:
                found.update({key: params for _, key, params in self._references(method, concept)})
        return found

    def _references(self, method: ResolvedMethod, concept: dict) -> list[tuple]:
        """(request, key, params) of each image set `method` asks for on `concept`."""
        from .references import reference_key, request_params

        found = []
        for request in method.cls.references(method.settings, concept):
            params = request_params(request, model=self.model, sample=self.sample,
                                    concept_id=concept["id"])  # fmt: skip
            found.append((request, reference_key(params), params))
        return found

    @property
    def anchor_captions(self) -> int:
        """Captions the `anchor` rule asks the LLM for: the most any method with an LLM
        anchor uses (each takes the first it needs); 0 when none asks."""
        from .constants import LLM_ANCHORS as LLM

        asking = [m.settings for m in self.all_trained.values()
                  if getattr(m.settings, "anchors", None) == LLM]  # fmt: skip
        return max([getattr(s, "anchor_captions", 1) for s in asking], default=0)

    def resources(self, method: str) -> dict:
        from .methods import KIND_RESOURCES

        return KIND_RESOURCES[self.all_trained[method].kind]
