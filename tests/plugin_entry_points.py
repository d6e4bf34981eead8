"""Entry points of the test plugins, built the way importlib.metadata would report them."""

from importlib.metadata import EntryPoint

TEST_PLUGIN = EntryPoint(name="acme", value="llmc_test_plugin", group="llmc")
BROKEN_PLUGIN = EntryPoint(name="broken", value="llmc_broken_plugin", group="llmc")


def faulty(name: str, attribute: str) -> EntryPoint:
    """An entry point naming one of the broken plugins in llmc_faulty_plugins."""
    return EntryPoint(name=name, value=f"llmc_faulty_plugins:{attribute}", group="llmc")
