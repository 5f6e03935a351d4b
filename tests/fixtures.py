"""Test data shared by tests and benchmarks (no pytest import: benchmarks run without it)."""


def make_cat_split():
    """A 'cat' split with 10/5 corefs and retains at every certainty level."""
    from crce.lists import Certainty, ConceptLists, Item, Provenance
    from crce.split import make_split

    levels = list(Certainty)
    lists = ConceptLists(
        concept="cat",
        id="cat",
        category="object",
        corefs=[Item(text=f"kitty number {i}", certainty=levels[i // 3]) for i in range(15)],
        retains=[Item(text=f"dog breed {i}", certainty=levels[i // 3]) for i in range(15)],
        provenance=Provenance(source="llm"),
    )
    return make_split(lists, seed=0)
