"""The targets beyond Table 1 on hand-made inputs: values checked against hand computations."""

import math

import numpy as np
import pandas as pd
import pytest

from crce.audit import agreement_table, audit_sheet, clip_answers, score_humans
from crce.metrics import robustness_table
from crce.quality import quality_table
from crce.settings import AuditSettings, QualitySettings
from crce.stats import frechet_distance


def unit(v):
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v)


def features_frame(rng):
    """SD and one method: 2 retain images (twins) and 30 neutral images each, in 3-D."""
    rows = []
    retain = {("tiger", 0): unit([1, 0, 0]), ("lynx", 0): unit([0, 1, 0])}
    moved = {("tiger", 0): unit([1, 1, 0]), ("lynx", 0): unit([0, 1, 0])}  # cos 0.7071 and 1
    for method, table in (("sd", retain), ("esd-x", moved)):
        for (prompt, k), f in table.items():
            rows.append({"method": method, "concept": "cat", "group": "retain_test",
                         "prompt": prompt, "image_index": k, "feature": f, "clip_score": math.nan})  # fmt: skip
    sd = rng.normal(size=(30, 3))
    for method, block, scores in (("sd", sd, 0.5), ("esd-x", sd + [2.0, 0, 0], 0.25)):
        for k, f in enumerate(block):
            rows.append({"method": method, "concept": "cat", "group": "neutral", "prompt": f"p{k}",
                         "image_index": 0, "feature": f, "clip_score": scores})  # fmt: skip
    return pd.DataFrame(rows), sd


def test_quality_table_on_hand_made_features():
    frame, sd = features_frame(np.random.default_rng(0))
    settings = QualitySettings(prompts="x.csv", kid_subsets=5, kid_subset_size=30)
    table = quality_table(frame, {"cat": "object"}, {"sd": "SD", "esd-x": "ESD-x"}, settings)
    cell = lambda m, metric: table[(table.method == m) & (table.metric == metric)].iloc[0]  # noqa: E731
    paired = cell("ESD-x", "paired_similarity")
    assert paired["scope"] == "object" and paired["n"] == 2
    assert abs(paired["value"] - (0.70710678 + 1) / 2) < 1e-6
    assert cell("SD", "clip_score")["value"] == 0.5 and cell("ESD-x", "clip_score")["n"] == 30
    fd = cell("ESD-x", "fd_vs_sd")
    assert abs(fd["value"] - 4.0) < 1e-9  # a pure shift by 2: |dmu|^2, equal covariances
    assert fd["value"] == pytest.approx(frechet_distance(sd + [2, 0, 0], sd))
    assert fd["spread_kind"] == "bootstrap_sd" and fd["spread"] > 0
    kid = cell("ESD-x", "kid_vs_sd")
    assert kid["value"] > 0 and kid["spread_kind"] == "se" and kid["n"] == 30
    assert "paired_similarity" not in set(table[table.method == "SD"].metric)  # SD is the twin


def test_robustness_table_on_hand_made_judgments():
    rows = []
    for method, answers in (("sd", {"paraphrase": "yyyn", "template": "yy"}),
                            ("crce", {"paraphrase": "ynnn", "template": "nn"})):  # fmt: skip
        for group, marks in answers.items():
            for a in marks:
                rows.append({"method": method, "concept": "cat", "category": "object",
                             "group": group, "answer": "yes" if a == "y" else "no"})  # fmt: skip
    rows.append({"method": "crce", "concept": "cat", "category": "object", "group": "template",
                 "answer": "invalid"})  # not counted  # fmt: skip
    metrics = pd.DataFrame([
        {"method": "sd", "category": "object", "metric": "Acc_U", "accuracy": 0.9},
        {"method": "crce", "category": "object", "metric": "Acc_U", "accuracy": 0.1},
    ])  # fmt: skip
    table = robustness_table(pd.DataFrame(rows), metrics, {"sd": "SD", "crce": "CRCE"})
    cell = table.set_index(["method", "prompts"])
    assert cell.loc[("SD", "paraphrase"), "Acc_P"] == 75.0
    assert cell.loc[("CRCE", "paraphrase"), "Acc_P"] == 25.0
    assert (
        cell.loc[("CRCE", "template"), "Acc_P"] == 0.0 and cell.loc[("CRCE", "template"), "n"] == 2
    )
    assert cell.loc[("CRCE", "all"), "Acc_P"] == round(1 / 6 * 100, 2)
    assert cell.loc[("CRCE", "all"), "Acc_U"] == 10.0 and cell.loc[("SD", "all"), "Acc_U"] == 90.0
    assert cell.loc[("CRCE", "all"), "ci_low"] < 16.67 < cell.loc[("CRCE", "all"), "ci_high"]


class LabelEncoder:
    """A stand-in embedding for the audit's logic: an image's feature is the one-hot of the
    label its file name says, a text's the one-hot of the label it names."""

    def __init__(self, labels):
        self.labels = labels

    def _one_hot(self, name):
        v = np.zeros(len(self.labels))
        v[self.labels.index(name)] = 1
        return v

    def images(self, paths):
        return np.stack([self._one_hot(p.split("/")[-1].split(".")[0]) for p in paths])

    def texts(self, texts):
        return np.stack([self._one_hot(t.removeprefix("a photo of ")) for t in texts])


def test_the_clip_judge_scores_each_image_against_the_right_label_set(cat_split):
    retains = [i.text for g in ("retain_train", "retain_test") for i in getattr(cat_split, g)]
    encoder = LabelEncoder(["cat", *retains])
    images = pd.DataFrame([
        {"group": "target", "question": "cat", "path": "x/cat.png"},  # shows the cat: yes
        {"group": "coref_test", "question": "cat", "path": f"x/{retains[0]}.png"},  # a retain: no
        {"group": "retain_test", "question": retains[1], "path": f"x/{retains[1]}.png"},  # yes
        {"group": "retain_test", "question": retains[1], "path": "x/cat.png"},  # the target: no
    ])  # fmt: skip
    answers = clip_answers(images, cat_split, encoder, "a photo of {}")
    assert list(answers) == ["yes", "no", "yes", "no"]


def audit_rows():
    rows = []
    for k, (judge, second) in enumerate([("yes", "yes")] * 20 + [("yes", "no")] * 5
                                        + [("no", "yes")] * 10 + [("no", "no")] * 15):  # fmt: skip
        rows.append({"method": "crce", "concept": f"c{k % 3}", "category": "object",
                     "group": "target", "prompt": "p", "question": "cat", "image_index": k,
                     "path": f"/tmp/{k}.png", "judge": judge, "second": second,
                     "reference": "clip"})  # fmt: skip
    return pd.DataFrame(rows)


def test_agreement_and_kappa_against_a_textbook_example():
    """Cohen's kappa's Wikipedia example: 20 yes/yes, 5 yes/no, 10 no/yes, 15 no/no:
    agreement 0.7, expected 0.5, kappa 0.4."""
    table = agreement_table(audit_rows()).iloc[0]
    assert table["n"] == 50 and table["agreement"] == 0.7 and table["kappa"] == 0.4
    assert table["judge_yes"] == 0.5 and table["reference_yes"] == 0.6


def test_the_audit_sheet_is_reproducible_and_scores_humans(tmp_path):
    rows = audit_rows()
    settings = AuditSettings(per_concept=4, seed=3)
    sheet = audit_sheet(rows, settings)
    assert len(sheet) == 12 and (sheet["human"] == "").all()
    assert sheet.equals(audit_sheet(rows, settings))
    assert not sheet.equals(audit_sheet(rows, AuditSettings(per_concept=4, seed=4)))
    filled = sheet.assign(human=sheet["second"])  # the people agree with CLIP everywhere
    scores = score_humans(filled)
    assert scores["clip"]["accuracy"] == 1.0 and scores["clip"]["kappa"] == 1.0
    assert scores["judge"]["n"] == 12
    expected = (filled["judge"] == filled["human"]).mean()
    assert scores["judge"]["accuracy"] == round(expected, 4)
    with pytest.raises(ValueError, match="no row of the sheet has a human answer"):
        score_humans(sheet)


def test_only_what_the_neutral_sampler_reads_reruns_it():
    """`sample_neutral`'s params: the prompt share and its seed, not the KID or reference
    settings (a change there must not resample every (method, concept) on the GPU)."""
    from crce.sample import plan_neutral

    prompts = pd.DataFrame({"prompt": [f"p{k}" for k in range(20)]})
    base = QualitySettings(prompts="x.csv", per_concept=5, seed=1)
    plan = plan_neutral(prompts, method="sd", concept="cat", **base.neutral_params())
    assert len(plan) == 5
    kid = base.model_copy(update={"kid_subsets": 7, "kid_subset_size": 3, "real_images": "r"})
    assert kid.neutral_params() == base.neutral_params()
    reseeded = base.model_copy(update={"seed": 2})
    assert reseeded.neutral_params() != base.neutral_params()
    other = plan_neutral(prompts, method="sd", concept="cat", **reseeded.neutral_params())
    assert list(other["prompt"]) != list(plan["prompt"])
    audit = AuditSettings()
    bigger_sheet = audit.model_copy(update={"per_concept": 99})
    assert bigger_sheet.second_judge_params() == audit.second_judge_params()
    assert audit.model_copy(update={"seed": 3}).second_judge_params() != audit.second_judge_params()
