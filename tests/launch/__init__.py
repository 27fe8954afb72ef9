"""Tests of the launcher (megatron_ext/launch/)."""
