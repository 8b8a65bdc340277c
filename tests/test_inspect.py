"""`python -m limo.data.inspect`: its figures recomputed from what the loader actually hands out."""

import re

import pytest

from limo.data import inspect as data_inspect
from limo.data import synthetic
from limo.data.dataset import load_samples, resolve_tokenizer
from limo.data.loader import PackedLoader
from limo.engine.config import DataConfig


def test_inspect_reports_what_training_will_see(capsys):
    text = data_inspect.main(["--data", "synthetic", "--max-tokens", "280", "--tokens-per-microbatch", "2048", "--world-size", "3"])
    assert capsys.readouterr().out.strip() == text
    cfg = DataConfig(path="synthetic", max_tokens=280, tokens_per_microbatch=2048)
    samples, report = load_samples(cfg, resolve_tokenizer(cfg))
    assert report.overlong > 0  # the cutoff bites, so the count is exercised
    assert f"over the cutoff of 280: {report.overlong} (drop: 0 truncated, {report.dropped} dropped)" in text
    assert f"tokens per epoch: {report.tokens} ({report.label_tokens} supervised" in text
    steps = [list(PackedLoader(samples, samples_per_step=32, tokens_per_microbatch=2048, epochs=1, world_size=3, rank=r)) for r in range(3)]
    micro = [len(s[0].micro_batches) for s in zip(*steps)]
    last = len(samples) - 32 * (len(micro) - 1)
    assert f"steps per epoch: {len(micro)} of 32 samples (last: {last})" in text
    efficiency = report.tokens / (3 * sum(micro) * 2048)
    assert f"{sum(micro) / len(micro):.2f} micro-batches per rank per step, {efficiency:.1%} of token slots used" in text
    assert f"passes per rank per epoch: {sum(micro)} packed, {sum(-(-len(s[0].sample_indices) // 3) for s in zip(*steps))} with one" in text
    worst = max(s[0].imbalance for s in zip(*steps))
    assert re.search(rf"worst {worst:.3f}$", text)
    histogram = [line for line in text.splitlines() if re.match(r"^\s+\d+-\d+\s+\d+", line)]
    assert sum(int(line.split()[1]) for line in histogram) == len(samples)


def test_inspect_bad_input_is_one_clear_line(tmp_path, capsys):
    def refused(argv: list[str]) -> str:
        with pytest.raises(SystemExit) as e:
            data_inspect.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("python -m limo.data.inspect: error: "), err
        return err

    (tmp_path / "bad.jsonl").write_text('{"question": "q"}\n')
    assert f"data.tokenizer='{tmp_path / 'none'}' is not a folder" in refused(["--data", str(tmp_path / "bad.jsonl"), "--tokenizer", str(tmp_path / "none")])
    (tmp_path / "empty").mkdir()
    assert f"no tokenizer in {tmp_path / 'empty'}: looked for tokenizer.json" in refused(["--data", str(tmp_path / "bad.jsonl"), "--tokenizer", str(tmp_path / "empty")])
    synthetic.byte_tokenizer().save_pretrained(str(tmp_path / "tok"))
    assert f"{tmp_path / 'bad.jsonl'}:1: field 'solution' is missing" in refused(["--data", str(tmp_path / "bad.jsonl"), "--tokenizer", str(tmp_path / "tok")])
    assert "--tokens-per-microbatch=100 is smaller than --max-tokens=200" in refused(["--data", "synthetic", "--max-tokens", "200", "--tokens-per-microbatch", "100"])

def test_inspect_at_cp_2_deals_data_over_the_groups_and_reports_the_split(capsys):
    text = data_inspect.main(["--data", "synthetic", "--max-tokens", "280", "--tokens-per-microbatch", "2048", "--world-size", "4",
                              "--cp", "2"])  # fmt: skip
    same = data_inspect.main(["--data", "synthetic", "--max-tokens", "280", "--tokens-per-microbatch", "2048", "--world-size", "2"])
    # 4 ranks at cp=2 read the data as 2 data-parallel ranks do
    assert text.splitlines()[-4].endswith(same.splitlines()[-3].split("ranks: ")[1])
    assert "x 2 data-parallel groups of 2 ranks" in text
    split = text.splitlines()[-1]
    assert split.startswith("context parallel x2") and "1024 per rank in a full one" in split and "imbalance 1.000" in split
    with pytest.raises(SystemExit):
        data_inspect.main(["--data", "synthetic", "--world-size", "3", "--cp", "2"])
    assert "--cp=2 does not divide --world-size=3" in capsys.readouterr().err
