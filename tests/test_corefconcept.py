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


@pytest.fixture
def dataset_server(tmp_path):
    """A local HTTP server with the two shared files and a tampered copy of object.json."""
    import functools
    import http.server
    import shutil
    import threading

    good, tampered = tmp_path / "good", tmp_path / "tampered"
    for folder in (good, tampered):
        folder.mkdir()
        for name in ("object.json", "ip.json"):
            shutil.copy(COREFCONCEPT / name, folder / name)
    (tampered / "object.json").write_text(
        (good / "object.json").read_text().replace("pooch", "pooh")
    )
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


SHA256 = {
    "object": "825c6ffb8905034901c53036becb7f51eed7b4c9ddc84d83af128fb0e5538690",
    "ip": "90c469329ca0f34b08595f70495661fc0d2f9badec7b32abbb9e66c04d58e0f1",
}


def test_fetch_checks_the_pinned_checksum(dataset_server, tmp_path):
    from crce.corefconcept import fetch

    out = tmp_path / "out" / "object.json"
    fetch(f"{dataset_server}/good", "object.json", SHA256["object"], out)
    assert out.read_bytes() == (COREFCONCEPT / "object.json").read_bytes()
    with pytest.raises(DatasetError, match=r"object\.json: sha256 \w+ differs from the pinned"):
        fetch(f"{dataset_server}/tampered", "object.json", SHA256["object"], tmp_path / "t.json")
    assert not (tmp_path / "t.json").exists()
    with pytest.raises(DatasetError, match=r"celebrity\.json: .*/good/celebrity\.json.*HTTP 404"):
        fetch(f"{dataset_server}/good", "celebrity.json", None, tmp_path / "c.json")


def test_a_local_dataset_missing_a_needed_file_is_named(tmp_path):
    from crce.concepts import Concept
    from crce.corefconcept import check_local_dataset

    objects = [Concept(id="cat", text="cat", category="object")]
    check_local_dataset(str(COREFCONCEPT), objects)  # no celebrity in the sheet: fine
    tom = Concept(id="tom-hanks", text="Tom Hanks", category="celebrity")
    with pytest.raises(DatasetError, match=r"has no celebrity\.json.*\(Tom Hanks\)"):
        check_local_dataset(str(COREFCONCEPT), [*objects, tom])
