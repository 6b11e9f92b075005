"""Every benchmark script runs end to end on small data (seconds, not minutes), so CI exercises each path:
vision.py and tune.py on scikit-learn's digits (no Fashion-MNIST needed), nlp.py on a handful of BBC articles,
dkm_memory.py on a small grid and paper_sizes.py (the demo's tests are in test_demo.py). The fp32 cache goes
to a temporary folder."""
import json

import pytest

import common
import torchdkm
import paper_sizes
import tune
import vision

# vision.py on digits: one model, the 1-bit budget (coremltools leaves fc's 10 channels, not a multiple of 4,
# uncompressed there), two fine-tuning seeds for every method.
VISION_TINY = ["--data", "digits", "--models", "resnet_small", "--budgets", "1bit", "--key-budgets", "1bit",
               "--seeds", "2", "--fp32-epochs", "3", "--steps", "2", "--no-progress"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "CACHE", tmp_path / "cache")
    return tmp_path / "cache"


def test_paper_sizes_match_the_paper_within_a_few_percent(tmp_path):
    models = ["ResNet-50", "MobileNet-v1"]
    try:
        import transformers  # noqa: F401

        models.append("DistilBERT")
    except ImportError:
        pass
    rows = {r["model"]: r for r in paper_sizes.main(["--quick", "--models", *models, "--out", str(tmp_path)])}
    assert set(rows) == set(models)
    for r in rows.values():
        assert abs(r["factor"] / r["paper_factor"] - 1) < 0.03, r
    assert abs(rows["ResNet-50"]["fp32_mib"] - 97.49) < 0.01  # 25,557,032 params
    assert abs(rows["ResNet-50"]["compressed_mib"] - 3.3) / 3.3 < 0.03
    assert 0.72 * 0.97 < rows["MobileNet-v1"]["compressed_mib"] < 0.74 * 1.03


def test_vision_benchmark_on_digits_every_method(tmp_path, cache):
    out = tmp_path / "v"
    vision.main(VISION_TINY + ["--out", str(out), "--tag", "t", "--tuning", str(tmp_path / "none.json")])
    res = json.loads((out / "t_resnet_small.json").read_text())
    methods = ["ptq_kmeans", "st_kmeans", "qat_lsq", "dkm"] + (["coreml_dkm"] if common.coreml_available() else [])
    by = {m: sorted((r for r in res["runs"] if r["method"] == m), key=lambda r: r["seed"]) for m in methods}
    assert {r["method"] for r in res["runs"]} == set(methods)
    assert all([r["seed"] for r in rs] == [0, 1] for rs in by.values())  # the same fine-tuning seeds for all
    for r in res["runs"]:
        assert 0 <= r["val_top1"] <= 1 and 0 <= r["top1"] <= 1
        assert r["hp_source"] == "defaults" and r["hp"] == vision.DEFAULTS[r["method"]]
    assert res["fp32"]["val_top1"] > 0.5  # the fp32 model learned something, so the runs mean something

    a = vision.parse(VISION_TINY)
    fp32, _ = vision.fp32_for("resnet_small", a, vision.load_data(a, log=lambda *_: None), lambda *_: None)
    cfg = torchdkm.DKMConfig(bits=4, dim=4, min_numel=0)
    dkm = by["dkm"][0]
    assert dkm["model_kib"] == pytest.approx(common.clustered_size(fp32, cfg)["model_kib"])
    layers = common.dkm_layers(fp32, cfg)
    n_w = sum(m.weight.numel() for m in layers.values())
    qat = by["qat_lsq"][0]  # 1-bit indices + fp16 scale and offset per output channel
    assert qat["bits_per_weight"] == pytest.approx(1 + sum(32 * m.weight.shape[0] for m in layers.values()) / n_w)
    if "coreml_dkm" in by:
        cm = by["coreml_dkm"][0]
        assert cm["fp32_layers"] == ["fc"] and cm["layers"] == len(layers) - 1
        fc = layers["fc"].weight.numel()
        fc_dkm_bits = -(-fc // 4) * 4 + 16 * 4 * 32
        assert (cm["model_kib"] - dkm["model_kib"]) * 1024 * 8 == pytest.approx(32 * fc - fc_dkm_bits)
        assert cm["bits_per_weight"] > dkm["bits_per_weight"]
    md = (out / "t.md").read_text()
    for label in ("bits/weight (compressed layers)", "model KiB (all params + buffers)", "fine-tuning seeds",
                  "DKM (torchdkm)", "k-means + STE fine-tuning", "validation"):
        assert label in md
    assert (out / "t.png").stat().st_size > 1000


def test_vision_reuses_runs_only_from_the_same_code_and_fp32_model(tmp_path, cache, monkeypatch):
    # --kd / --bn-recal: recorded in each run's settings, which the re-run must still recognise
    args = VISION_TINY + ["--methods", "ptq_kmeans", "--out", str(tmp_path), "--tag", "r", "--no-tuning", "--kd", "0.5",
                          "--bn-recal", "1"]
    vision.main(args)
    first = json.loads((tmp_path / "r_resnet_small.json").read_text())
    assert len(first["runs"]) == 2 and first["key"]["fp32_sha1"] and first["key"]["code"]

    calls = []
    real = vision.run_one
    monkeypatch.setattr(vision, "run_one", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    vision.main(args)  # same code, settings, fp32 model: nothing is re-run
    assert calls == []
    monkeypatch.setattr(common, "code_version", lambda *s: {"sources": "other"})
    vision.main(args)  # other code: every run again
    assert calls == ["ptq_kmeans", "ptq_kmeans"]
    assert json.loads((tmp_path / "r_resnet_small.json").read_text())["key"]["code"] == "other"


def test_tune_tiny_sweeps_equally_on_validation_and_vision_uses_its_choice(tmp_path, cache):
    res = tune.main(["--tiny", "--out", str(tmp_path), "--no-progress", "--fp32-epochs", "3"])
    runs = res["models"]["resnet_small"]["runs"]
    methods = ["st_kmeans", "qat_lsq", "dkm"] + (["coreml_dkm"] if common.coreml_available() else [])
    counts = {m: sum(r["method"] == m for r in runs) for m in methods}
    assert set(counts.values()) == {3}, counts  # the same number of settings for every method
    assert all("top1" not in r and "val_top1" in r for r in runs)  # the test set was never evaluated
    chosen = res["chosen"]["resnet_small"]["1bit"]
    for m in methods:
        best = max((r for r in runs if r["method"] == m), key=lambda r: r["val_top1"])
        assert chosen[m]["val_top1"] == best["val_top1"] and chosen[m]["settings_tried"] == 3
    assert "**chosen**" in (tmp_path / "tuning.md").read_text()

    out = tmp_path / "v"
    base = VISION_TINY + ["--methods", "dkm", "qat_lsq", "--seeds", "1", "--out", str(out), "--tag", "t",
                          "--tuning", str(tmp_path / "tuning.json")]
    vision.main(base)
    for r in json.loads((out / "t_resnet_small.json").read_text())["runs"]:
        assert r["hp"] == chosen[r["method"]]["settings"] and r["hp_source"] == "tuning.json resnet_small 1bit"
    vision.main(base + ["--lr", "5e-4"])  # a flag overrides the tuned value
    for r in json.loads((out / "t_resnet_small.json").read_text())["runs"]:
        if r["hp"]["lr"] == 5e-4:
            assert r["hp_source"].endswith("+ flags lr")
    assert {r["hp"]["lr"] for r in json.loads((out / "t_resnet_small.json").read_text())["runs"]} >= {5e-4}


def test_tune_merge_unions_sweeps_of_one_model_run_per_method(tmp_path, cache):
    """Sweeps of the same model by method group (parallel processes) merge into one table: every run kept, each
    method's choice made over its own runs; sweeps with other settings refuse to merge."""
    tiny = ["--tiny", "--out", str(tmp_path), "--no-progress", "--fp32-epochs", "3"]
    a = tune.main(tiny + ["--methods", "st_kmeans", "--tag", "a"])
    b = tune.main(tiny + ["--methods", "dkm", "--knob-values", "dkm=0.2,0.3", "--tag", "b"])
    assert [r["hp"] for r in b["models"]["resnet_small"]["runs"]] == [{"lr": 1e-3, "tau_scale": 0.2},
                                                                      {"lr": 1e-3, "tau_scale": 0.3}]
    res = tune.main(["--merge", "a", "b", "--out", str(tmp_path)])
    runs = res["models"]["resnet_small"]["runs"]
    assert runs == a["models"]["resnet_small"]["runs"] + b["models"]["resnet_small"]["runs"]
    assert res["chosen"]["resnet_small"]["1bit"] == {**a["chosen"]["resnet_small"]["1bit"],
                                                     **b["chosen"]["resnet_small"]["1bit"]}
    assert "--methods st_kmeans" in res["command"] and "--methods dkm" in res["command"]
    assert "tau_scale [0.2, 0.3]" in (tmp_path / "tuning.md").read_text()
    assert "--knob-values dkm=0.2,0.3" in res["command"]
    tune.main(tiny + ["--methods", "dkm", "--kd", "0.5", "--tag", "c"])
    with pytest.raises(SystemExit, match="different settings"):
        tune.main(["--merge", "a", "c", "--out", str(tmp_path)])
    other = json.loads((tmp_path / "b.json").read_text())
    other["models"]["resnet_small"]["key"]["fp32_sha1"] = "another fp32 model"
    (tmp_path / "d.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="different fp32 weights"):
        tune.main(["--merge", "a", "d", "--out", str(tmp_path)])


def test_nlp_benchmark_on_a_handful_of_articles(tmp_path, cache, monkeypatch):
    """STE and DKM with two fine-tuning seeds at the seed budget (mean ± std rows, STE at DKM's size), then
    ptq_kmeans added by a second invocation that keeps the runs of the first (same key)."""
    pytest.importorskip("transformers")  # the [transformers] / [all] extra
    import nlp

    common_args = ["--budgets", "2bit", "--train-subset", "16", "--test-subset", "8", "--max-len", "16", "--steps",
                   "2", "--fp32-epochs", "1", "--kd", "0.5", "--out", str(tmp_path), "--no-progress"]
    res = nlp.main(common_args + ["--methods", "st_kmeans", "dkm", "--seeds", "2", "--seed-budgets", "2bit"])
    assert sorted((r["method"], r["seed"]) for r in res["runs"]) == [(m, s) for m in ("dkm", "st_kmeans")
                                                                      for s in (0, 1)]
    emb = ["encoder.embeddings.position_embeddings.weight", "encoder.embeddings.word_embeddings.weight"]
    assert all(r["frozen"] == emb for r in res["runs"])  # k-means once, then frozen: the embeddings only
    saved = json.loads((tmp_path / "nlp.json").read_text())
    assert saved["key"]["fp32_sha1"] and "seed" not in saved["key"]["settings"]

    def rows():
        md = (tmp_path / "nlp.md").read_text()
        assert "fine-tuning seeds" in md and "Distillation for every fine-tuned method: (1 - 0.5)" in md
        return {line.split(" | ")[0][2:]: line.split(" | ") for line in md.splitlines() if line.startswith("| ")}

    ste, dkm = rows()["k-means + STE fine-tuning"], rows()["DKM (torchdkm)"]
    for row in (ste, dkm):
        assert " ± " in row[5] and " ± " in row[7] and row[8] == "2"  # accuracy, F1: mean ± std of 2 seeds

    calls = []
    real = nlp.run
    monkeypatch.setattr(nlp, "run", lambda *a, **k: calls.append((a[0], k["seed"])) or real(*a, **k))
    res = nlp.main(common_args + ["--methods", "ptq_kmeans", "st_kmeans", "dkm", "--seed-budgets", "11.8x"])
    assert calls == [("ptq_kmeans", 0)]  # 2bit now gets 1 seed: the STE and DKM runs of seed 0 are kept
    assert len(res["runs"]) == 5
    for r in res["runs"]:  # the same layers and layout for every k-means method: the same size
        assert r["mib"] == res["runs"][0]["mib"] and r["factor"] > 10
        assert r["bits_per_weight"] == pytest.approx(2.0, abs=0.01)
        assert r["max_distinct"] <= 4  # the finalized Linear layers hold at most 2^2 distinct weights
    r = rows()
    ptq, ste, dkm = r["k-means, no fine-tuning"], r["k-means + STE fine-tuning"], r["DKM (torchdkm)"]
    assert ptq[8] == "1" and " ± " not in ptq[5] and ste[8] == dkm[8] == "2"  # kept rows: still 2 seeds
    assert ste[3] == dkm[3] == ptq[3] == f"{res['runs'][0]['mib']:.2f}"  # whole-model MiB: STE's = DKM's
    assert ste[2] == dkm[2] == "2.000"


def test_dkm_memory_small_grid(tmp_path):
    import dkm_memory

    rows = dkm_memory.main(["--numel", "16384", "--ks", "4", "--dims", "1", "--iters", "1", "--groups", "1,8",
                            "--out", str(tmp_path / "m.md")])
    assert {(r["impl"], r["k"], r["groups"]) for r in rows} == {(i, 4, g) for i in ("direct", "lean") for g in (1, 8)}
    assert all(r["extra_bytes"] > 0 and r["weight_bytes"] == 16384 * 4 for r in rows)
    text = (tmp_path / "m.md").read_text()
    assert "| 1 | 1 | 1 | 4 |" in text and "| 8 | 1 | 1 | 4 |" in text and "16384 weights" in text


def test_dkm_sharded_quick(tmp_path):
    import dkm_sharded

    rows = dkm_sharded.main(["--procs", "1,2", "--steps", "1", "--warmup", "1", "--quick",
                             "--out", str(tmp_path / "s.md")])
    assert [(r[0]["procs"], r[0]["shard"]) for r in rows] == [(1, False), (2, False), (2, True)]
    assert all(len(r["times"]) == 1 and r["times"][0] > 0 for ranks in rows for r in ranks)
    assert "| 2 | yes |" in (tmp_path / "s.md").read_text()


def test_vision_grouped_luts_on_digits_every_kmeans_method(tmp_path, cache):
    """--group-size / --channel-scale reach ptq_kmeans, st_kmeans and dkm alike, sizes count every LUT and scale,
    the flags are part of the run key, and --side-by-side puts two granularities in one table."""
    base = ["--data", "digits", "--models", "resnet_small", "--budgets", "1bit", "--fp32-epochs", "1", "--steps", "1",
            "--seeds", "1", "--no-progress", "--no-tuning", "--out", str(tmp_path)]
    kmeans = ["--methods", "ptq_kmeans", "st_kmeans", "dkm"]
    vision.main(base + kmeans + ["--group-size", "16", "--channel-scale", "--tag", "g"])
    vision.main(base + ["--methods", "ptq_kmeans", "--tag", "p"])
    res = json.loads((tmp_path / "g_resnet_small.json").read_text())
    assert res["key"]["settings"]["group_size"] == 16 and res["key"]["settings"]["channel_scale"] is True
    assert {r["method"] for r in res["runs"]} == {"ptq_kmeans", "st_kmeans", "dkm"}
    # fc has 10 output channels: one group of 10; the stem's 9 weights per channel take no 4-vectors: no scale
    fitted = {"fc": {"group_size": 10}, "stem.0": {"channel_scale": False}}
    assert all(r["fitted_layers"] == fitted and r["granularity"] == "g16 + channel scale" for r in res["runs"])

    from torchdkm.app.zoo.models import build_model

    bits = n_w = 0  # by hand: 1-bit indices + 16 × 4 LUT entries per group + a scale per channel, all at fp32
    for name, m in common.dkm_layers(build_model("resnet_small"), torchdkm.DKMConfig(min_numel=0)).items():
        rows, n = m.weight.shape[0], m.weight.numel()
        groups = rows // fitted.get(name, {}).get("group_size", 16)
        scales = 0 if name == "stem.0" else rows
        bits, n_w = bits + n + (groups * 16 * 4 + scales) * 32, n_w + n
    for r in res["runs"]:
        assert r["bits_per_weight"] == pytest.approx(bits / n_w)
        assert 1 < r["bits_per_weight_lut16"] < r["bits_per_weight"]
    per_tensor = json.loads((tmp_path / "p_resnet_small.json").read_text())["runs"][0]
    assert per_tensor["granularity"] == "per-tensor" and per_tensor["bits_per_weight"] < bits / n_w
    assert "LUT granularity of the k-means methods: g16 + channel scale" in (tmp_path / "g.md").read_text()

    vision.main(["--side-by-side", "p", "g", "--out", str(tmp_path), "--tag", "s"])
    md = (tmp_path / "s.md").read_text()
    assert "per-tensor: bits/w" in md and "g16 + channel scale: bits/w" in md and "--group-size 16" in md
    row = next(line for line in md.splitlines() if "k-means, no fine-tuning" in line)
    assert f"{per_tensor['bits_per_weight']:.3f}" in row and f"{bits / n_w:.3f}" in row
    assert next(line for line in md.splitlines() if "DKM (torchdkm)" in line).count(" - ") == 4  # no per-tensor run


def test_vision_layer_budget_reaches_kmeans_methods_and_qat_alike(tmp_path, cache):
    """--layer-budget gives the named layers another budget in every k-means method and in uniform QAT (at its
    whole bits), the sizes count it, the label shows it; a rule naming no layer or an unknown budget is refused."""
    base = ["--data", "digits", "--models", "resnet_small", "--budgets", "1bit", "--fp32-epochs", "1", "--steps", "1",
            "--seeds", "1", "--no-progress", "--no-tuning", "--out", str(tmp_path), "--tag", "lb",
            "--methods", "ptq_kmeans", "st_kmeans", "qat_lsq", "dkm"]
    vision.main(base + ["--layer-budget", "stem.0=4bit", r"re:layer1\.\d\.conv1=2bit"])
    res = json.loads((tmp_path / "lb_resnet_small.json").read_text())
    assert res["key"]["settings"]["layer_budget"] == ["stem.0=4bit", r"re:layer1\.\d\.conv1=2bit"]
    changed = {"stem.0": (4, 1), "layer1.0.conv1": (2, 1), "layer1.1.conv1": (2, 1)}

    from torchdkm.app.zoo.models import build_model

    layers = common.dkm_layers(build_model("resnet_small"), torchdkm.DKMConfig(min_numel=0))
    n_w = sum(m.weight.numel() for m in layers.values())
    kmeans = qat = 0  # by hand: indices + one fp32 LUT per layer; QAT: b bits + fp16 scale and offset per channel
    for name, m in layers.items():
        bits, dim = changed.get(name, (4, 4))
        n, rows = m.weight.numel(), m.weight.shape[0]
        kmeans += -(-n // dim) * bits + 2 ** bits * dim * 32
        qat += n * (bits // dim) + rows * 2 * 16
    assert {r["method"] for r in res["runs"]} == {"ptq_kmeans", "st_kmeans", "qat_lsq", "dkm"}
    for r in res["runs"]:
        assert {n: (c["bits"], c["dim"]) for n, c in r["fitted_layers"].items()} == changed
        assert r["bits_per_weight"] == pytest.approx((qat if r["method"] == "qat_lsq" else kmeans) / n_w)
    assert "1bit (16×4-d; 1 layer 16×1-d; 2 layers 4×1-d)" in (tmp_path / "lb.md").read_text()

    with pytest.raises(torchdkm.ConfigError, match=r"\['re:nothing\.\*'\] match no supported layer"):
        vision.main(base + ["--layer-budget", "re:nothing.*=4bit", "--tag", "lb2"])
    with pytest.raises(SystemExit):
        vision.parse(base + ["--layer-budget", "stem.0=3bit"])


def test_centroid_use_counts_distinct_vectors_of_the_finalized_layers(tmp_path, cache):
    import centroid_use

    out = tmp_path / "c.md"
    rows = centroid_use.main(["--data", "digits", "--fp32-epochs", "1", "--steps", "2", "--models", "resnet_small",
                              "--budgets", "2bit", "--out", str(out)])
    assert len(rows) == 16 and all(r[:2] == ["resnet_small", "2bit"] and r[4] == 4 for r in rows)
    for _, _, layer, vectors, k, used0, used1, small0, small1 in rows:
        assert 1 <= used0 <= k and 1 <= used1 <= k and 1 <= small0 <= vectors and 1 <= small1 <= vectors
    stem = next(r for r in rows if r[2] == "stem.0")
    assert stem[3] == 144  # 16 × 1 × 3 × 3 weights, 1-d
    assert "fewest used" in out.read_text()


def test_whole_merge_keeps_each_rows_provenance_and_chooses_per_budget_on_validation(tmp_path):
    """LLM rows from runs made side by side merge into one table: a later file's row replaces the same key, each
    budget's chosen setting has the lowest mean validation score over its seeds, and files with other evaluation
    settings are refused."""
    import whole
    real = json.loads((common.HERE / "llm" / "results" / "whole.json").read_text())  # every field
    settings, real = real["settings"], real["rows"][0]
    row = lambda key, budget, method, score, commit, seed=0, **kw: dict(  # noqa: E731
        real, key=key, budget=budget, budget_bytes=budget * 1e7, method=method, valid_score=score, commit=commit,
        seed=seed, **kw)
    a = dict(settings=settings, rows=[row("4b-planned-ste", 4, "planned-ste", 3.62, "a"),
                                      row("4b-planned-dkm", 4, "planned-dkm", 3.69, "a"),
                                      row("3b-planned-ste", 3, "planned-ste", 4.00, "a")])
    b = dict(settings=settings, rows=[row("4b-planned-dkm+hard_forward=True", 4, "planned-dkm", 3.60, "b",
                                          variant="hard_forward=True"),
                                      row("3b-planned-ste", 3, "planned-ste", 4.10, "b")])
    for name, res in (("a", a), ("b", b)):
        (tmp_path / f"{name}.json").write_text(json.dumps(res))
    merge = ["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "m")]
    out = whole.main(merge)
    got = {r["key"]: (r["commit"], r["chosen"]) for r in out["rows"]}
    assert got == {"4b-planned-ste": ("a", False), "4b-planned-dkm": ("a", False),
                   "4b-planned-dkm+hard_forward=True": ("b", True), "3b-planned-ste": ("b", True)}
    assert [r["budget"] for r in out["rows"]] == [4, 4, 4, 3]  # table order: budgets high to low
    assert json.loads((tmp_path / "m.json").read_text())["rows"] == out["rows"]
    out = whole.main(merge + ["--drop", "4b-planned-dkm+hard_forward=True"])
    assert [r["key"] for r in out["rows"] if r["chosen"]] == ["4b-planned-ste", "3b-planned-ste"]
    with pytest.raises(SystemExit, match="no such row"):
        whole.main(merge + ["--drop", "4b-nothing"])
    # a setting is chosen by its mean over seeds, not by its luckiest seed
    c = dict(settings=settings, rows=[row("4b-planned-ste-s1", 4, "planned-ste", 3.63, "c", seed=1),
                                      row("4b-planned-dkm+hard_forward=True-s1", 4, "planned-dkm", 3.70, "c",
                                          variant="hard_forward=True", seed=1)])
    (tmp_path / "c.json").write_text(json.dumps(c))
    out = whole.main(merge[:3] + [str(tmp_path / "c.json")] + merge[3:])
    chosen = [r["key"] for r in out["rows"] if r["chosen"]]
    assert chosen == ["4b-planned-ste", "4b-planned-ste-s1", "3b-planned-ste"]
    b["settings"] = dict(settings, window=256)
    (tmp_path / "b.json").write_text(json.dumps(b))
    with pytest.raises(SystemExit, match="window"):
        whole.main(merge)


def test_whole_rows_trained_with_other_settings_are_settings_of_their_own(tmp_path, monkeypatch):
    """A fine-tuning lr (or steps, ...) other than the defaults is recorded per row ('train_set'), named in its key,
    and makes a setting of its own for selection and for the DKM-vs-STE table; rows from before have the defaults."""
    import whole
    res = json.loads((common.HERE / "llm" / "results" / "whole.json").read_text())
    real = res["rows"][0]
    row = lambda key, method, score, seed=0, **kw: dict(  # noqa: E731
        real, key=key, budget=4, method=method, valid_score=score, seed=seed, layout="", calib="c", variant="",
        ptb_ppl=70.0 + score, wiki_ppl=20.0 + score, **kw)
    rows = [row("4b-planned-ste", "planned-ste", 3.62), row("4b-planned-dkm", "planned-dkm", 3.63),
            row("4b-planned-ste+lr0.001", "planned-ste", 3.60, train_set="lr 0.001"),
            row("4b-planned-ste+lr0.001-s1", "planned-ste", 3.61, seed=1, train_set="lr 0.001")]
    rows[0].pop("train_set", None), rows[1].pop("train_set", None)
    (tmp_path / "a.json").write_text(json.dumps(dict(settings=res["settings"], rows=rows)))
    out = whole.main(["--merge", str(tmp_path / "a.json"), "--out", str(tmp_path / "m")])
    assert {r["key"] for r in out["rows"] if r["chosen"]} == {"4b-planned-ste+lr0.001", "4b-planned-ste+lr0.001-s1"}
    vs = whole.dkm_vs_ste(out["rows"])  # DKM ran at the default lr only: compared with STE at the default lr
    assert [v[0] for v in vs] == ["4, Fisher on c"] * 2 and all("(seeds 0)" in v[3] for v in vs)
    monkeypatch.setitem(whole.DKM_TRAIN, "lr", 1e-3)
    assert whole.train_set() == "lr 0.001" and "lr 0.001" in whole.train_text()
    monkeypatch.setitem(whole.DKM_TRAIN, "lr", whole.DEFAULT_TRAIN["lr"])
    assert whole.train_set() == ""


def test_dkm_meets_ste_from_the_same_start(tmp_path):
    """DKM-vs-STE pairs rows of one start: k-means-started DKM against k-means-started STE, GPTQ-started against
    GPTQ-started; a start without its partner gives no comparison."""
    import whole
    res = json.loads((common.HERE / "llm" / "results" / "whole.json").read_text())
    real = res["rows"][0]
    row = lambda key, method, ppl, seed=0: dict(  # noqa: E731
        real, key=key, budget=4, method=method, valid_score=3.6, seed=seed, layout="", calib="c", variant="",
        train_set="", ptb_ppl=ppl, wiki_ppl=ppl / 4)
    rows = [row("4b-planned-ste", "planned-ste", 75.0), row("4b-planned-dkm", "planned-dkm", 76.0),
            row("4b-planned-gptq-ste", "planned-gptq-ste", 71.0), row("4b-planned-gptq-dkm", "planned-gptq-dkm", 70.0)]
    vs = whole.dkm_vs_ste(rows)
    assert [v[:2] for v in vs] == [["4, Fisher on c", "PTB test"], ["4, Fisher on c", "Wiki test"],
                                   ["4, Fisher on c, from GPTQ's indices", "PTB test"],
                                   ["4, Fisher on c, from GPTQ's indices", "Wiki test"]]
    assert [v[2].split()[0] for v in vs] == ["76.00", "19.00", "70.00", "17.50"]
    assert [v[3].split()[0] for v in vs] == ["75.00", "18.75", "71.00", "17.75"]
    assert [v[0] for v in whole.dkm_vs_ste(rows[:3])] == ["4, Fisher on c"] * 2


def test_whole_budgets_are_bit_widths_or_file_sizes(tmp_path):
    import whole
    assert whole.parse_budget("4") == ("4-bit uniform size", "4b", 4, None)
    assert whole.parse_budget(" 40MiB") == ("40 MiB file", "40mib", None, 40.0)
    with pytest.raises(SystemExit, match="give uniform bit widths"):
        whole.parse_budget("40MB")
    with pytest.raises(SystemExit):  # a file size has no uniform row to run
        whole.main(["--budgets", "40MiB", "--methods", "planned,uniform", "--allow-dirty", "--out", str(tmp_path / "w")])


def test_whole_rows_record_their_calibration_and_a_calibration_is_a_setting_of_its_own(tmp_path, monkeypatch):
    """The Fisher calibration is per row: a file from before (calibration in its settings) merges with each row
    given that calibration, rows differing only in calibration are separate settings on validation, and the
    calibration windows come from PTB train, or half of them from the Wikipedia training titles."""
    import torch
    import whole
    real = json.loads((common.HERE / "llm" / "results" / "whole.json").read_text())
    settings, real = real["settings"], real["rows"][0]
    row = lambda key, method, score, **kw: dict(  # noqa: E731
        real, key=key, budget=4, method=method, valid_score=score, seed=0, **kw)
    old_rows = [row("4b-planned-ste", "planned-ste", 3.62), row("4b-uniform", "uniform", 4.5)]
    for r in old_rows:
        r.pop("calib", None), r.pop("fisher_s", None)
    old = dict(settings=dict(settings, calib_windows=8, calib_seq=256, fisher_s=30.0), rows=old_rows)
    new = dict(settings=settings, rows=[row("4b-planned-ste+cal32x256mix", "planned-ste", 3.60, fisher_s=120.0,
                                            calib="32×256 PTB train + Wikipedia train")])
    for name, res in (("old", old), ("new", new)):
        (tmp_path / f"{name}.json").write_text(json.dumps(res))
    out = whole.main(["--merge", str(tmp_path / "old.json"), str(tmp_path / "new.json"), "--out", str(tmp_path / "m")])
    got = {r["key"]: (r["calib"], r["fisher_s"], r["chosen"]) for r in out["rows"]}
    assert got == {"4b-planned-ste": ("8×256 PTB train", 30.0, False), "4b-uniform": ("", 0.0, False),
                   "4b-planned-ste+cal32x256mix": ("32×256 PTB train + Wikipedia train", 120.0, True)}
    assert "calib_windows" not in out["settings"]
    assert "32×256 PTB train + Wikipedia train (120 s)" in (tmp_path / "m.md").read_text()

    monkeypatch.setattr(whole.lm, "ptb", lambda split, tok: torch.arange(1000))
    monkeypatch.setattr(whole.lm, "wiki_summaries", lambda part, tok: torch.arange(10_000, 12_000))
    ptb = whole.calibration(None, 5, 16)
    starts = torch.randint(0, 1000 - 16, (5,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(ptb, torch.stack([torch.arange(s, s + 16) for s in starts.tolist()]))  # the draws of before
    mix = whole.calibration(None, 5, 16, "ptb+wiki")
    assert mix.shape == (5, 16) and bool((mix[:3] < 1000).all()) and bool((mix[3:] >= 10_000).all())
    assert bool((mix[:, 1:] - mix[:, :-1] == 1).all())  # contiguous windows
