"""bench.py on the tiny preset: every section runs, in its worker processes, and the report holds real figures.
(The full-size figures are bench.py's job, not the test suite's: they take half an hour.)"""

import json
import re

import bench


def test_bench_runs_on_the_tiny_preset(tmp_path, capsys):
    out = tmp_path / "bench.md"
    bench.main(["--preset", "tiny", "--cache", str(tmp_path / "cache"), "--out", str(out), "--repeats", "1",
                "--prompt-tokens", "16", "--new-tokens", "4", "--train-batch", "2", "--stages", "1",
                "--stage-iters", "2"])
    report = out.read_text()
    results = json.loads((tmp_path / "cache" / "results.json").read_text())
    rows = {line.split("|")[1].strip(): line for line in report.splitlines() if line.startswith("| ours") or
            line.startswith("| transformers")}
    assert set(rows) == {"ours fp32", "ours bf16", "ours fp16", "ours int8", "ours int4", "transformers fp32",
                         "transformers bf16"}
    for name, r in results["inference"].items():
        assert r["load_s"] > 0 and r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and r["encode_s"] > 0, name
        assert 0.05 < r["peak_rss_gb"] < 8, name                  # the worker's own peak, not its parent's
    assert re.search(r"\(\d+\.\d\dx\)", rows["ours bf16"])        # ratio against the reference
    # the two implementations computed the same thing on the same files
    assert results["parity"]["logits"] < 1e-4 and results["parity"]["features"] < 1e-4 and results["parity"]["tokens"]
    assert results["bandwidth"] > 0.5
    assert results["train"]["step_s"] > 0 and all(map(lambda x: x == x, results["train"]["losses"]))
    assert results["stages"]["1"]["examples_s"] > 0
    assert "Targets:" in report and "Memory bandwidth" in report
    assert "instruction sets:" in report and "torch kernels:" in results["cpu"]     # which kernels ran
    # a second run reuses the written weights
    bench.main(["--preset", "tiny", "--cache", str(tmp_path / "cache"), "--only", "weights"])
    assert "reusing" in capsys.readouterr().out
