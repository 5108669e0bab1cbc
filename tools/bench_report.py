#!/usr/bin/env python
"""Collect the benchmark scripts' results into docs/benchmarks.md: machine, versions, one table of every
figure with its target, and the command that reproduces each.

    .venv/bin/python tools/bench_report.py          # after tools/bench_train.py, bench_data.py, bench_embed.py, bench_dense.py

When runs/bench/avx2/ holds results (the training and data scripts rerun on AVX2 kernels, as `make bench` does
on a CPU with AVX-512), they get a table of their own.
"""

import json
from pathlib import Path
from typing import List

import bench_common

ORDER = ("train", "data", "embed", "dense", "onnx")
AVX2 = "avx2"  # the folder under the results of the run on AVX2 kernels (`make bench` on a newer CPU)
AVX2_INTRO = ("Training and data figures rerun with `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`, so that "
              "PyTorch and oneDNN use only AVX2 kernels, as on CPUs without AVX-512 (most laptops, many servers); "
              "`precision=auto` is then fp32. CPU kind: {kind}.")
INTRO = """# Benchmarks

Every figure is the ratio of two things measured side by side in one run: timed rounds alternate between the two
sides so that machine noise hits both alike; the table gives the medians over rounds (range in the JSON files under
`runs/bench/`). `make bench` reruns everything and rewrites this page. Tests never assert on time.
"""


def _number(value: float, unit: str) -> str:
    if unit == "FLOP/s":
        return f"{value / 1e9:.1f} GFLOP/s"
    return f"{value:,.1f} {unit}"


def _load(folder: Path) -> List[dict]:
    return [json.loads((folder / f"{name}.json").read_text()) for name in ORDER if (folder / f"{name}.json").is_file()]


def _table(results: List[dict]) -> List[str]:
    lines = ["| figure | ours | theirs | ratio | target | met |", "|---|---|---|---|---|---|"]
    for result in results:
        for f in result["figures"]:
            target = f"{f['target']:g}" if f.get("target") else "-"
            met = ("yes" if f["ratio"] >= f["target"] else "**no**") if f.get("target") else "-"
            lines.append(f"| {f['name']} | {_number(f['ours'], f['unit'])} | {_number(f['theirs'], f['unit'])} | "
                         f"{f['ratio']:.2f} | {target} | {met} |")
    return lines


def main() -> None:
    results = _load(bench_common.RESULTS)
    if not results:
        raise SystemExit(f"no results in {bench_common.RESULTS}: run the tools/bench_*.py scripts first")
    machine = results[0]["machine"]
    lines = [INTRO, "## Machine", ""]
    lines += [f"- {key}: {value}" for key, value in machine.items()]
    lines += [f"- commit: {bench_common.git_commit()}", "", "## Figures", ""] + _table(results)
    beside = _load(bench_common.RESULTS / AVX2)
    if beside:
        lines += ["", "## The same machine on AVX2 kernels", "", AVX2_INTRO.format(kind=beside[0]["machine"]["cpu kind"]),
                  ""] + _table(beside)
    lines += ["", "## Commands", ""]
    for result in results + beside:
        lines.append(f"- `{result['command']}`: " + "; ".join(f["id"] for f in result["figures"]))
    notes = Path("docs/benchmarks_notes.md")
    if notes.is_file():
        lines += ["", notes.read_text().rstrip()]
    out = Path("docs/benchmarks.md")
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
