import pytest
from helpers import REPO, snakemake

from crce.concepts import SheetError, load_sheet, slugify


@pytest.mark.parametrize(
    "text, slug",
    [
        ("bat (animal)", "bat-animal"),
        ("Beyoncé", "beyonce"),
        ("Samuel L. Jackson", "samuel-l-jackson"),
        ("Apple (company)", "apple-company"),
        ("  SpongeBob   SquarePants ", "spongebob-squarepants"),
    ],
)
def test_slugify(text, slug):
    assert slugify(text) == slug


def test_shipped_sheet_has_the_papers_50_concepts():
    concepts = load_sheet(REPO / "resources" / "concepts.tsv")
    counts = {c: sum(1 for x in concepts if x.category == c) for c in ("object", "ip", "celebrity")}
    assert counts == {"object": 20, "ip": 15, "celebrity": 15}
    by_text = {c.text: c for c in concepts}
    assert by_text["bat (animal)"].id == "bat-animal"
    assert by_text["Apple (company)"].category == "object"
    assert len({c.id for c in concepts}) == 50


BAD_SHEETS = {
    "duplicate concept": ("cat\tobject\nCat\tobject\n", "line 3", "duplicate concept"),
    "duplicate id": ("bat (animal)\tobject\nbat animal\tobject\n", "line 3", "duplicate id"),
    "unknown category": ("cat\tanimal\n", "line 2", "unknown category"),
    "empty text": ("cat\tobject\n\tobject\n", "line 3", "empty concept"),
    "id escapes": ("cat\tobject\t../x\n", "line 2", "not path-safe"),
    "id with slash": ("cat\tobject\ta/b\n", "line 2", "not path-safe"),
    "no ASCII to slug": ("cat\tobject\n熊猫\tobject\n", "line 3", "give the row an id"),
    "only punctuation": ("???\tobject\n", "line 2", "`id` column, e.g. ???\tobject\tpanda"),
    "id too long": (f"cat\tobject\t{'c' * 101}\n", "line 2", "at most 100 characters"),
}


def test_a_long_concept_gets_a_bounded_stable_id(tmp_path):
    """A 300-character concept: its id fits any file system's 255-byte names, keeps its first
    words, is the same in every run, and two long texts with one prefix get two ids."""
    from crce.concepts import slugify

    long_a = "a very long description of " + "an elaborate castle " * 14 + "at dawn"
    long_b = long_a.replace("at dawn", "at dusk")
    assert len(long_a) >= 300
    path = _write(tmp_path, f"{long_a}\tobject\n{long_b}\tobject\n")
    first, second = load_sheet(path)
    assert len(first.id) <= 64 and first.id.startswith("a-very-long-description-of-an")
    assert first.id != second.id and first.id == slugify(long_a) == load_sheet(path)[0].id
    assert first.text == long_a  # the prompt keeps the whole text
    (tmp_path / f"{first.id}.json").write_text("{}")  # a name the disk takes


def _write(tmp_path, body):
    header = (
        "concept\tcategory\tid\n" if body.count("\t") > body.count("\n") else "concept\tcategory\n"
    )
    path = tmp_path / "sheet.tsv"
    path.write_text(header + body)
    return path


@pytest.mark.parametrize("name", sorted(BAD_SHEETS))
def test_bad_rows_are_named(tmp_path, name):
    body, where, problem = BAD_SHEETS[name]
    with pytest.raises(SheetError) as err:
        load_sheet(_write(tmp_path, body))
    message = str(err.value)
    assert where.replace("line ", ":") in message and problem in message
    assert "\n" not in message


# Every bad row reaches the workflow through the one load_sheet call of common.smk: two
# kinds (a row against another, a row alone) show the message gets there; the test above
# checks each message.
@pytest.mark.parametrize("name", ["duplicate concept", "id escapes"])
def test_bad_sheet_stops_the_workflow_before_any_job(workdir, tmp_path, name):
    body, where, problem = BAD_SHEETS[name]
    sheet = _write(tmp_path, body)
    result = snakemake(workdir, "-n", "splits", "--config", f"concepts={sheet}")
    assert result.returncode != 0
    lines = [line for line in result.stdout.splitlines() if problem in line]
    assert len(lines) == 1 and where.replace("line ", ":") in lines[0]
    assert not (workdir / "results").exists()


def test_missing_column(tmp_path):
    path = tmp_path / "s.tsv"
    path.write_text("name\tcategory\ncat\tobject\n")
    with pytest.raises(SheetError, match="missing column"):
        load_sheet(path)


def test_a_sheet_saved_with_a_byte_order_mark_reads(tmp_path):
    path = tmp_path / "excel.tsv"
    path.write_bytes("concept\tcategory\ncat\tobject\n".encode("utf-8-sig"))
    assert [c.text for c in load_sheet(path)] == ["cat"]


def test_a_comma_separated_sheet_is_named_as_such(tmp_path):
    path = tmp_path / "sheet.csv"
    path.write_text("concept,category\ncat,object\n")
    with pytest.raises(
        SheetError, match=r"must be tab-separated \(this one looks comma-separated\)"
    ):
        load_sheet(path)


@pytest.mark.parametrize(
    "content, problem",
    [
        ('{"corefs": [{"text": "kitty", "certainty": "High"}', "not valid JSON"),
        ('["kitty"]', "expected a JSON object"),
        (
            '{"corefs": [{"text": "kitty", "certainty": "Sure"}], "retains": []}',
            "corefs.0.certainty",
        ),
    ],
)
def test_a_malformed_curated_list_names_the_file_and_the_concept(tmp_path, content, problem):
    from crce.concepts import Concept
    from crce.corefs import ListsError, curated_lists

    path = tmp_path / "cat.json"
    path.write_text(content)
    with pytest.raises(ListsError) as err:
        curated_lists(path, Concept(id="cat", text="cat", category="object"))
    assert str(path) in str(err.value) and "'cat'" in str(err.value) and problem in str(err.value)
