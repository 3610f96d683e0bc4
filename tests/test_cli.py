import json

import pytest

from qgait.cli import COMMANDS, main


def test_commands_registered():
    assert {"train", "eval", "data", "info"} <= set(COMMANDS)


def test_info_prints_backends_and_summary(capsys):
    assert main(["info", "--model.width", "0.25"]) == 0
    out = capsys.readouterr().out
    assert "reference" in out and "MACs per frame" in out and "GaitLite3D" in out


def test_train_then_eval_on_synthetic(tmp_path, capsys):
    pytest.importorskip("qgait.data.synthetic")
    data, out = tmp_path / "data", tmp_path / "run"
    common = ["--config", "synthetic_fp", "--data", str(data), "--out", str(out),
              "--data.synthetic.n_subjects", "6", "--data.synthetic.views", '["000", "090"]',
              "--data.train_ids", "[001, 004]", "--data.test_ids", "[005, 006]",
              "--data.P", "2", "--data.K", "2", "--data.frames", "4", "--train.progress", "false",
              "--train.amp", "none", "--train.threads", "1"]
    assert main(["train", *common, "--train.iterations", "2"]) == 0
    assert (out / "last.pt").exists() and (out / "config.json").exists()
    # --resume continues the same run to a later iteration count
    assert main(["train", *common, "--train.iterations", "3", "--resume"]) == 0
    from qgait.model_io import load_checkpoint
    assert load_checkpoint(out / "last.pt")["step"] == 3
    capsys.readouterr()
    js = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(out / "last.pt"), "--data", str(data),
                 "--amp", "none", "--no-progress", "--json", str(js)]) == 0
    text = capsys.readouterr().out
    assert "CASIA-B rank-1" in text and "NM" in text
    res = json.loads(js.read_text())
    assert set(res["casia_b"]["cross_view"]) == {"NM", "BG", "CL"}
    assert res["n_sequences"] == 2 * 10 * 2


def test_bad_override_is_reported(capsys):
    assert main(["train", "--config", "synthetic_fp", "--optim.lrr", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown key 'optim.lrr'" in err[0] and "'optim.lr'" in err[0]


def test_data_import_png(tmp_path, capsys):
    Image = pytest.importorskip("PIL.Image")
    import numpy as np
    from qgait.data import OpenGaitDataset
    src = tmp_path / "png" / "001" / "nm-01" / "090"
    src.mkdir(parents=True)
    for t in range(3):
        img = np.zeros((120, 80), np.uint8)
        img[20:110, 30 + t:50 + t] = 255  # a standing figure, shifting right
        Image.fromarray(img).save(src / f"{t:03d}.png")
    assert main(["data", "import-png", str(tmp_path / "png"), str(tmp_path / "pkl"),
                 "--workers", "0", "--no-progress"]) == 0
    ds = OpenGaitDataset(tmp_path / "pkl", progress=False)
    assert len(ds) == 1 and ds.n_frames(0) == 3 and ds.frames(0).max() == 1
