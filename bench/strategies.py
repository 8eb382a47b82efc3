"""The cold-start strategies the quality bench compares: random, the published anchors, the LLM over the whole
pool, the default config, and the family of cold-start rules the default is picked from (leave one dataset out,
``bench/lodo.py``); each is a ``--set`` style list of overrides on the default config."""

from __future__ import annotations

from dataclasses import dataclass

from bench.common import cache_key


@dataclass(frozen=True)
class Strategy:
    name: str
    kind: str  # "random" | "entropy_all" | "anchor" | "pipeline"
    overrides: tuple[str, ...] = ()  # ``--set`` style overrides on the default config
    note: str = ""
    family: bool = False  # a cold-start rule the leave-one-dataset-out choice picks from
    task: bool = False  # reads the task-aware LLM's columns (score.task: the dataset's prompt and label names)


# The cold-start family: k (budget/2 or budget clusters) x quotas (by size, or one per cluster first) x the
# preference within a cluster (uniform: the floor; nearest to the centroid; LLM uncertainty against typicality).
K_SETTINGS = {"B/2": "cluster.labels_per_cluster=2", "B": "cluster.labels_per_cluster=1"}
# k-means seeding (cluster.init) and its name suffix; auto is k-means++ from cluster.kmeanspp_min_k clusters
INITS = {"random": "", "kmeans++": "+kpp", "auto": "+auto"}
WITHIN = {"stratified": "uniform within each cluster (random key)", "cluster_only": "nearest to the centroid",
          "typical_uncertain": "LLM uncertainty percentile - distance percentile"}


def family() -> list[Strategy]:
    out = []
    for rule, within in WITHIN.items():
        for k_name, k_set in K_SETTINGS.items():
            for quota in ("size", "cover"):
                for init in INITS:
                    # At k = B/2 size quotas visit every cluster already (no cover), and seeding is only
                    # compared where it was expected to matter (one cluster per label).
                    if k_name == "B/2" and (quota == "cover" or init != "random"):
                        continue
                    name = f"{rule}@{k_name}" + ("+cover" if quota == "cover" else "") + INITS[init]
                    seeds = ("auto seeding (k-means++ from cluster.kmeanspp_min_k clusters, random below)"
                             if init == "auto" else f"{init} seeding")
                    note = (f"k = {k_name}, {seeds}, quotas by "
                            f"{'size' if quota == 'size' else 'one per cluster, then size'}, {within}")
                    out.append(Strategy(name, "pipeline", (k_set, f"select.rule={rule}", f"select.quota={quota}",
                                                           f"cluster.init={init}"), note, family=True))
    return out


def strategies(default_rule: str) -> list[Strategy]:
    """The strategies compared; ``labelnext`` is the default config, unmodified."""
    return [
        Strategy("random", "random", note="uniform sample of the pool, no LLM"),
        Strategy("typiclust", "anchor", note="scikit-activeml TypiClust, its defaults (k-means with budget clusters, "
                                             "the most typical document of each)"),
        Strategy("probcover", "anchor", note="scikit-activeml ProbCover, its defaults (greedy ball coverage)"),
        Strategy("entropy_all", "entropy_all", note="LLM over every pool doc, top-B by mean token entropy"),
        Strategy("labelnext", "pipeline", (), f"the default config (rule {default_rule})"),
        *family(),
    ]


def needs_llm(strategies_: list[Strategy]) -> bool:
    """Whether any strategy ranks by LLM scores (then every pool document is scored once, and cached)."""
    from labelnext.ops.select.selector import uses_llm
    from labelnext.pipelines.config import load_config

    return any(s.kind == "entropy_all" or (s.kind == "pipeline" and uses_llm(load_config(overrides=list(
        s.overrides)).select)) for s in strategies_)


# A label-round setting added after the cold-start results were cached: it cannot change a cold start, so
# cold-start keys leave it out and those results stay valid; the loop's keys (with_labels) hold it.
LABELS_ONLY_SELECT = {"margin_distance_weight"}


def strategy_settings(st: Strategy, with_labels: bool = False) -> str:
    """The resolved settings a strategy's result depends on (the default config's, for ``labelnext``)."""
    from labelnext.pipelines.config import load_config

    if st.kind in ("random", "anchor"):
        return st.kind
    cfg = load_config(overrides=list(st.overrides))
    select = cfg.select.model_dump_json(exclude=None if with_labels else LABELS_ONLY_SELECT)
    return cache_key(cfg.cluster.model_dump_json(), cfg.candidates.model_dump_json(), select,
                     cfg.embed.model, cfg.score.model, cfg.score.max_tokens)



# The task-aware cold-start family (score.task set per dataset, bench/task_prompts.py): the uncertainty is the
# entropy over the label names, and ``+labels`` fills the cluster quotas spreading over the LLM's predicted labels
# (select.llm_label_quota). k = B with cover quotas and auto seeding is the default's clustering; k = B/2 leaves
# two documents per cluster for the LLM to choose between.
_K_B = ("cluster.labels_per_cluster=1", "select.quota=cover", "cluster.init=auto")
_K_HALF = ("cluster.labels_per_cluster=2", "select.quota=size", "cluster.init=random")
_LABELS = ("select.llm_label_quota=true",)
TASK_FAMILY = {
    "task:typical_uncertain@B+cover+auto": (_K_B + ("select.rule=typical_uncertain",),
                                            "k = B, choice entropy percentile - distance percentile"),
    "task:typical_uncertain@B/2": (_K_HALF + ("select.rule=typical_uncertain",),
                                   "k = B/2, choice entropy percentile - distance percentile"),
    "task:baseline@B/2": (_K_HALF + ("select.rule=baseline",), "k = B/2, the highest choice entropy in each cluster"),
    "task:cluster_only@B+cover+auto+labels": (_K_B + ("select.rule=cluster_only",) + _LABELS,
                                              "k = B, nearest to the centroid, quotas spread over the LLM's labels"),
    "task:cluster_only@B/2+labels": (_K_HALF + ("select.rule=cluster_only",) + _LABELS,
                                     "k = B/2, nearest to the centroid, quotas spread over the LLM's labels"),
    "task:typical_uncertain@B/2+labels": (_K_HALF + ("select.rule=typical_uncertain",) + _LABELS,
                                          "k = B/2, choice entropy against typicality, quotas spread over the "
                                          "LLM's labels"),
}


def task_strategies(default_rule: str) -> list[Strategy]:
    """``bench.quality --task``: the task-aware rules against random, TypiClust and the LLM-free default."""
    anchors_and_default = [s for s in strategies(default_rule) if s.name in ("random", "typiclust", "labelnext")]
    return [
        *anchors_and_default,
        Strategy("task:entropy_all", "entropy_all", note="the LLM over every pool document, top-B by choice "
                 "entropy", task=True),
        *[Strategy(name, "pipeline", overrides, note, family=True, task=True)
          for name, (overrides, note) in TASK_FAMILY.items()],
    ]
