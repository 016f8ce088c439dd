"""The package layers (tests/layering.py): the import graph keeps them, a planted violation of each rule is
reported with its file:line, the README shows the same table, and the light imports stay light."""

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from layering import LAYERS, check, layer_of, markdown_table

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_graph_keeps_the_layers():
    violations = check(ROOT)
    assert not violations, "layer rules broken:\n" + "\n".join(map(str, violations))


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


def test_planted_violations_are_reported(tmp_path):
    # The real store module and the real LoRA module, each with one forbidden import planted at its end.
    for rel in ("spatialalign_jax/common/store.py", "spatialalign_jax/model/lora.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    store, lora = tmp_path / "spatialalign_jax/common/store.py", tmp_path / "spatialalign_jax/model/lora.py"
    store_line = len(store.read_text().splitlines()) + 1
    store.write_text(store.read_text() + "import jax\n")
    lora_line = len(lora.read_text().splitlines()) + 3
    lora.write_text(lora.read_text() + "\ndef f():\n    from spatialalign_jax.train import trainer\n")
    for init in ("spatialalign_jax", "spatialalign_jax/common", "spatialalign_jax/model", "spatialalign_jax/train",
                 "scoring"):
        _write(tmp_path, f"{init}/__init__.py", "")
    _write(tmp_path, "spatialalign_jax/train/trainer.py", "from ..model import lora\n")  # fine: train -> model
    _write(tmp_path, "spatialalign_jax/common/relative.py", "from ..sample import schedule\n")
    _write(tmp_path, "scoring/run.py", """\
        import numpy as np
        import optax
        from spatialalign_jax.model.config import WanConfig
        from spatialalign_jax.common.store import Store
        """)
    _write(tmp_path, "spatialalign_jax/extra/thing.py", "x = 1\n")

    found = {(v.file, v.line, v.rule) for v in check(tmp_path)}
    report = "\n".join(map(str, check(tmp_path)))
    print(report)
    expected = {
        ("spatialalign_jax/common/store.py", store_line, "third-party"),
        ("spatialalign_jax/model/lora.py", lora_line, "layer order"),
        ("spatialalign_jax/common/relative.py", 1, "layer order"),
        ("scoring/run.py", 2, "third-party"),
        ("scoring/run.py", 3, "allowed imports"),
        ("spatialalign_jax/model/lora.py", lora_line, "cycle"),
        ("spatialalign_jax/extra/thing.py", 1, "unknown layer"),
    }
    assert expected <= found, f"missing {expected - found}; got:\n{report}"
    assert len(found) == len(expected), f"unexpected reports:\n{report}"
    messages = {(v.file, v.rule): str(v) for v in check(tmp_path)}
    assert messages["spatialalign_jax/common/store.py", "third-party"] == (
        f"spatialalign_jax/common/store.py:{store_line}: `import jax`: common must not import jax "
        f"(common: {LAYERS['common'].what}) [third-party]")
    assert "`from spatialalign_jax.train import trainer`: model (layer 2) imports train (layer 5)" in (
        messages["spatialalign_jax/model/lora.py", "layer order"])
    assert "model -> train -> model" in messages["spatialalign_jax/model/lora.py", "cycle"]
    assert "scoring may import only common, world" in messages["scoring/run.py", "allowed imports"]


def test_layer_of():
    assert layer_of("spatialalign_jax") == layer_of("spatialalign_jax.losses") == "facade"
    assert layer_of("spatialalign_jax.common.store.Store") == "common"
    assert layer_of("spatialalign_jax.sample.__main__") == "sample"
    assert layer_of("converters.load") == "converters"
    assert layer_of("spatialalign_jax.data") is None  # a module path from before the layers


def test_readme_shows_the_table():
    readme = (ROOT / "README.md").read_text()
    assert markdown_table() in readme, "README's 'For contributors' table differs from tests/layering.py:\n" + (
        markdown_table())


def test_light_imports_stay_light():
    """What the scoring process imports of spatialalign_jax loads no JAX or PyTorch (the facade is lazy),
    and the facade's names resolve to their layers."""
    code = ("import sys, spatialalign_jax, spatialalign_jax.common.store, spatialalign_jax.common.dsr_types; "
            "heavy = sorted({'jax', 'flax', 'torch', 'orbax'} & {m.split('.')[0] for m in sys.modules}); "
            "assert not heavy, heavy")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr

    import spatialalign_jax
    import spatialalign_jax.losses
    from converters.load import load_transformer
    from spatialalign_jax.model.config import WanConfig
    from spatialalign_jax.train.losses import preference_loss

    assert spatialalign_jax.load_transformer is load_transformer and spatialalign_jax.WanConfig is WanConfig
    assert spatialalign_jax.losses.preference_loss is preference_loss
