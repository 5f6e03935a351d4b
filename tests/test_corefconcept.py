import pytest
from helpers import COREFCONCEPT, REPO

from crce.concepts import load_sheet
from crce.corefconcept import DatasetError, find_entry, import_entry
from crce.split import make_split

SHEET = {c.text: c for c in load_sheet(REPO / "resources" / "concepts.tsv")}
ENTRIES = [
    (name, entry)
    for name in ("object.json", "ip.json")
    for entries in __import__("json").loads((COREFCONCEPT / name).read_text()).values()
    for entry in entries
]


@pytest.mark.parametrize("name, entry", ENTRIES, ids=[e["concept"] for _, e in ENTRIES])
def test_every_entry_imports_with_the_datasets_split(name, entry):
    concept = SHEET[entry["concept"]]
    found, path = find_entry(COREFCONCEPT, concept.text.upper())
    assert found["concept"] == entry["concept"]
    lists = import_entry(found, concept, path.name)
    assert lists.category == concept.category  # the sheet wins over the file and `type`
    split = make_split(lists, seed=1)
    for part in ("coref_train", "coref_test", "retain_train", "retain_test"):
        key = part.replace("_", "-").split("-")
        field = f"{key[1]}-{key[0]}"
        assert [i.text for i in getattr(split, part)] == entry[field]
    assert [
        len(getattr(split, p)) for p in ("coref_train", "coref_test", "retain_train", "retain_test")
    ] == [10, 5, 10, 5]
    labels = entry["train-coref-certainty"]
    assert [i.certainty.value for i in split.coref_train] == labels
    weights = {"Very High": 1.0, "High": 0.8, "Normal": 0.6, "Low": 0.4, "Very Low": 0.2}
    assert [i.weight for i in split.coref_train] == [weights[x] for x in labels]


@pytest.mark.parametrize("text", ["deer", "ship", "apple (fruit)"])
def test_missing_certainty_label_becomes_lowest_with_warning(text):
    entry, path = find_entry(COREFCONCEPT, text)
    lists = import_entry(entry, SHEET[text], path.name)
    warnings = [w for w in lists.provenance.warnings if w.field == "test-retain-certainty"]
    assert len(warnings) == 1 and "Very Low" in warnings[0].what
    assert make_split(lists, 0).retain_test[-1].certainty.value == "Very Low"


def test_truck_target_in_its_test_corefs_is_kept_with_warning():
    entry, path = find_entry(COREFCONCEPT, "truck")
    lists = import_entry(entry, SHEET["truck"], path.name)
    assert any(i.text.lower() == "truck" for i in make_split(lists, 0).coref_test)
    assert any("equals the target" in w.what for w in lists.provenance.warnings)


def test_apple_company_found_by_text_not_file_or_type():
    entry, path = find_entry(COREFCONCEPT, "apple (company)")
    assert path.name == "object.json" and entry["type"] == "IP"
    lists = import_entry(entry, SHEET["Apple (company)"], path.name)
    assert lists.category == "object"
    assert any(w.field == "type" for w in lists.provenance.warnings)


def test_celebrities_are_not_in_the_two_files():
    assert find_entry(COREFCONCEPT, "Taylor Swift") is None


def test_structural_errors_are_clear():
    entry, _ = find_entry(COREFCONCEPT, "cat")
    broken = dict(entry)
    del broken["train-retain"]
    with pytest.raises(DatasetError, match="'cat'.*train-retain"):
        import_entry(broken, SHEET["cat"], "object.json")
    broken = dict(entry, **{"test-coref-certainty": ["Sure"] * 5})
    with pytest.raises(DatasetError, match="unknown certainty level 'Sure'"):
        import_entry(broken, SHEET["cat"], "object.json")
