"""The import layers of docs/architecture.md ("Import direction"), held on grimp's import graph.

grimp counts the imports inside functions too, so a circle that only closes at run time (the two
there were went through such imports) fails here as well.
"""
import subprocess
import sys

import grimp
import pytest

TOP = ("xlearner.cli", "xlearner.pipeline", "xlearner.report", "xlearner.transfer", "xlearner.runs",
       "xlearner.stages", "xlearner.engine")

# package or module -> what it never reaches, through any chain of imports
NEVER = {
    "xlearner.metrics": ("xlearner.data", "xlearner.config", "xlearner.tasks", "xlearner.models") + TOP,
    "xlearner.tasks": ("xlearner.data", "xlearner.config") + TOP,
    "xlearner.models": TOP,
    "xlearner.config": TOP,
    "xlearner.data": TOP,
    "xlearner.engine": TOP[:-1],
    "xlearner.stages": TOP[:4],
    "xlearner.runs": TOP[:4],
    "xlearner.report": TOP[:2] + ("xlearner.transfer",),
    "xlearner.transfer": TOP[:2],
    "xlearner.pipeline": TOP[:1] + ("xlearner.bench",),
    "xlearner.bench": TOP[:1],
}
# ... and what it does not import itself (it may reach them through config's task names)
NOT_DIRECTLY = {
    "xlearner.engine": ("xlearner.tasks", "xlearner.models", "xlearner.data"),
    "xlearner.data": ("xlearner.models",),
}
LEAVES = ("xlearner.errors", "xlearner.files", "xlearner.targets")


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("xlearner")


def _show(chain) -> str:
    return " -> ".join(m.removeprefix("xlearner.") for m in chain)


def test_no_import_cycle(graph):
    cycles = {}
    for a in sorted(graph.modules):
        for b in sorted(graph.find_modules_directly_imported_by(a)):
            back = graph.find_shortest_chain(importer=b, imported=a)
            if back:
                cycles.setdefault(frozenset(back), (a, *back))
    assert not cycles, "import cycles: " + "; ".join(_show(c) for c in cycles.values())


def test_the_graph_holds_the_known_modules(graph):
    """Guards the rules below against a graph that silently lost modules (a wrong package name)."""
    for name in (*NEVER, *LEAVES, "xlearner.data.schema", "xlearner.data.transforms", "xlearner.ablations"):
        assert name in graph.modules, name
    assert graph.direct_import_exists(importer="xlearner.metrics", imported="xlearner.targets")


@pytest.mark.parametrize("importer", sorted(NEVER))
def test_layers_never_reach_upwards(graph, importer):
    bad = []
    for imported in NEVER[importer]:
        chains = graph.find_shortest_chains(importer=importer, imported=imported, as_packages=True)
        bad += [_show(c) for c in sorted(chains)]
    assert not bad, f"{importer} reaches a layer above it: " + "; ".join(bad)


@pytest.mark.parametrize("importer", sorted(NOT_DIRECTLY))
def test_layers_do_not_import_directly(graph, importer):
    mods = [importer, *graph.find_descendants(importer)]
    bad = sorted(f"{m} imports {i}" for m in mods for i in graph.find_modules_directly_imported_by(m)
                 if any(i == p or i.startswith(p + ".") for p in NOT_DIRECTLY[importer]))
    assert not bad, "; ".join(bad)


def test_leaves_and_the_cli_are_imported_as_they_should_be(graph):
    for leaf in LEAVES:
        assert not graph.find_modules_directly_imported_by(leaf), leaf
    assert graph.find_modules_that_directly_import("xlearner.cli") <= {"xlearner.__main__"}, \
        "only the `xlearner` entry points (the script, `python -m xlearner`) import cli"
    runtime = grimp.build_graph("xlearner", exclude_type_checking_imports=True)
    assert not runtime.find_modules_directly_imported_by("xlearner.ablations")  # config for type hints only


def test_building_the_parser_loads_no_torch():
    """`xlearner --help` and the parser of every sub-command stay light: stage and task names are
    read from their registries only when an argument uses them."""
    code = ("import sys\n"
            "from xlearner.cli import build_parser\n"
            "p = build_parser()\n"
            "p.format_help()\n"
            "p.parse_args(['run', '--ablation', 'levers'])\n"
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('xlearner'))\n"
            "p.parse_args(['train', 'quick', '--stage', 'msmt'])\n"
            "assert 'torch' in sys.modules  # the stage registry was read to check the choice\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    out = subprocess.run([sys.executable, "-m", "xlearner.cli", "train", "q", "--stage", "nope"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "invalid choice: 'nope'" in out.stderr and "'msmt'" in out.stderr
