"""A normal run does not show torch's ShardedTensor deprecation that megatron-core's
checkpoints cause; every other warning still shows (checkpointing/dist.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.runs import REPO, child_env

SCRIPT = textwrap.dedent('''
    import json, sys, tempfile, warnings

    def main():
        import torch
        from megatron_ext.checkpointing.dist import SHARDED_TENSOR_DEPRECATION  # the filter
        from megatron_ext.parallel import init_distributed

        init_distributed(1, 1, 1234)
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        def state(fill):  # two layers of a stacked tensor, as a model's layers are saved
            return {f"layer{i}": ShardedTensor.from_rank_offsets(
                "layers", torch.full((1, 4), fill), (0, i, 2), replica_id=0,
                prepend_axis_num=1) for i in range(2)}

        directory = tempfile.mkdtemp()
        from megatron_ext.checkpointing.writer import keep_writes_in_process

        keep_writes_in_process()  # as our saves do: no helper process to start
        dist_checkpointing.save(state(1.0), directory)
        loaded = dist_checkpointing.load(state(0.0), directory)  # shown on stderr, if at all
        assert float(sum(t.sum() for t in loaded.values())) == 8.0
        with warnings.catch_warnings(record=True) as control:  # the same load, unfiltered
            warnings.filters[:] = [f for f in warnings.filters
                                   if not (f[1] and f[1].match(SHARDED_TENSOR_DEPRECATION))]
            dist_checkpointing.load(state(0.0), directory)
        # the same message from elsewhere, and another from megatron-core, still show
        warnings.warn_explicit(SHARDED_TENSOR_DEPRECATION, FutureWarning, "elsewhere.py", 1,
                               module="elsewhere")
        warnings.warn_explicit("another future change", FutureWarning, "torch.py", 2,
                               module="megatron.core.dist_checkpointing.strategies.torch")
        print(json.dumps([str(w.message) for w in control]))

    if __name__ == "__main__":
        main()
''')


def test_sharded_tensor_deprecation_is_quiet_and_nothing_else(tmp_path):
    script = tmp_path / "save_load.py"
    script.write_text(SCRIPT, encoding="utf-8")
    result = subprocess.run([sys.executable, str(script)], env=child_env(), cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    control = json.loads(result.stdout.strip().splitlines()[-1])
    assert any("deprecating ShardedTensor" in m for m in control), control  # the premise
    stderr = result.stderr
    assert stderr.count("deprecating ShardedTensor") == 1, stderr[-3000:]  # elsewhere's
    assert "elsewhere.py:1: FutureWarning" in stderr
    assert "torch.py:2: FutureWarning: another future change" in stderr
