"""Entry points of the test plugins, built the way importlib.metadata would report them."""

from importlib.metadata import EntryPoint

TEST_PLUGIN = EntryPoint(name="acme", value="llmc_test_plugin", group="llmc")
BROKEN_PLUGIN = EntryPoint(name="broken", value="llmc_broken_plugin", group="llmc")
