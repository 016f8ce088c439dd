"""The DSR-Dataset generator (spatialalign_jax.dataset): seeded and reproducible to the byte, balanced over the
six types, train/test disjoint, readable by the scorer's CSV reader, a published test set imported as is,
the from/to variant, and the vocabulary file's checks."""

import csv
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import yaml

from scoring.prompts import load_prompt_csv
from spatialalign_jax.common.dsr_types import DSR_TYPES
from spatialalign_jax.common.prompt_parse import parse_dsr_prompt
from spatialalign_jax.dataset import (DEFAULT_VOCABULARY, DatasetError, VocabularyError, generate, load_vocabulary,
                                      parse_vocabulary, type_counts)
from spatialalign_jax.dataset.cli import main

ROOT = Path(__file__).resolve().parents[1]
EVAL120 = ROOT / "scoring" / "reference" / "eval120.csv"
COLUMNS = "group,type,prompt_id,scene,initial_SR,final_SR,animal,object,prompt,split"


def _run(tmp_path, name, *args):
    out = tmp_path / name
    rc = main(["--out", str(out), *args])
    assert rc == 0
    return out


def _read(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _tiny_vocab(tmp_path, text):
    path = tmp_path / "vocab.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_same_seed_same_bytes_other_seed_other_prompts(tmp_path):
    a, b = _run(tmp_path, "a", "--seed", "3"), _run(tmp_path, "b", "--seed", "3")
    c = _run(tmp_path, "c", "--seed", "4")
    for name in ("train.csv", "test.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
        assert (a / name).read_bytes() != (c / name).read_bytes()
    assert {r["prompt"] for r in _read(a / "train.csv")} != {r["prompt"] for r in _read(c / "train.csv")}


def test_default_run_is_balanced_disjoint_and_readable(tmp_path, capsys):
    out = _run(tmp_path, "out")
    printed = capsys.readouterr().out
    assert "500 prompts (LR 84, RL 84, LT 83, TL 83, RT 83, TR 83)" in printed
    assert "120 prompts (LR 20, RL 20, LT 20, TL 20, RT 20, TR 20)" in printed
    assert (out / "train.csv").read_text().splitlines()[0] == COLUMNS
    train, test = load_prompt_csv(out / "train.csv", split=None), load_prompt_csv(out / "test.csv", split=None)
    assert len(train) == 500 and len(test) == 120
    assert {r["split"] for r in train} == {"train"} and {r["split"] for r in test} == {"test"}
    # 500 = 6 x 83 + 2: the first two types of the SPEC table get one more; 120 = 6 x 20 exactly
    assert Counter(r["type"] for r in train) == {"LR": 84, "RL": 84, "LT": 83, "TL": 83, "RT": 83, "TR": 83}
    assert Counter(r["type"] for r in test) == {t: 20 for t in DSR_TYPES}
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert len({r["prompt"] for r in train}) == 500 and len({r["prompt_id"] for r in train + test}) == 620
    vocab = load_vocabulary()
    for r in train + test:
        parts = parse_dsr_prompt(r["prompt"])  # the SPEC template, naming the row's own fields
        assert (parts.scene, parts.animal, parts.object, parts.dsr_type) == (r["scene"], r["animal"], r["object"],
                                                                             r["type"])
        t = DSR_TYPES[r["type"]]
        assert (r["initial_SR"], r["final_SR"]) == (t.initial_phrase, t.final_phrase)
        assert parts.verb in vocab.animals[r["animal"]], r["prompt"]  # the animal's own verbs only
        assert r["prompt_id"] == f"{r['group']}_{r['type']}"
    # every animal drawn, none hugely more than another (weights undo the verb-list lengths)
    per_animal = Counter(r["animal"] for r in train)
    assert set(per_animal) == set(vocab.animals) and max(per_animal.values()) < 3 * min(per_animal.values())


def test_type_counts():
    assert type_counts(12) == {t: 2 for t in DSR_TYPES}
    assert list(type_counts(9).values()) == [2, 2, 2, 1, 1, 1]
    assert sum(type_counts(0).values()) == 0


def test_vocabulary_scenes_are_not_the_published_test_scenes():
    published = {r["scene"].rstrip(",") for f in ("eval120.csv", "eval30.csv")
                 for r in load_prompt_csv(ROOT / "scoring" / "reference" / f)}
    assert not published & set(load_vocabulary().scenes)


def test_published_test_csv_is_the_test_set(tmp_path):
    out = _run(tmp_path, "out", "--test-csv", str(EVAL120), "--train", "60")
    published = load_prompt_csv(EVAL120)
    test = load_prompt_csv(out / "test.csv", split=None)
    assert [(r["prompt_id"], r["prompt"], r["group"], r["type"]) for r in test] == [
        (r["prompt_id"], r["prompt"], r["group"], r["type"]) for r in published]
    train = load_prompt_csv(out / "train.csv", split=None)
    assert len(train) == 60 and not {r["prompt"] for r in train} & {r["prompt"] for r in test}

    out = _run(tmp_path, "triples", "--test-csv", str(EVAL120), "--disjoint-triples")
    held = {(r["animal"], r["object"], r["type"]) for r in published}
    train = load_prompt_csv(out / "train.csv", split=None)
    assert len(train) == 500 and not {(r["animal"], r["object"], r["type"]) for r in train} & held


def test_a_published_prompt_the_vocabulary_also_makes_is_left_out(tmp_path):
    # 1 animal x 1 verb x 1 object x 2 scenes: two prompts per type; the test CSV holds one LR prompt.
    vocab = _tiny_vocab(tmp_path, """\
        animals: {cat: [walks]}
        objects: [chair]
        scenes: [In a red room, In a blue room]
        """)
    held = "In a blue room, a cat is on the left of a chair, then the cat walks to the right of the chair."
    test_csv = tmp_path / "t.csv"
    test_csv.write_text(f'type,prompt_id,scene,initial_SR,final_SR,animal,object,prompt\n'
                        f'LR,p1,In a blue room,on the left of,to the right of,cat,chair,"{held}"\n')
    out = _run(tmp_path, "out", "--vocab", str(vocab), "--test-csv", str(test_csv), "--train", "6")
    train = _read(out / "train.csv")
    lr = [r["prompt"] for r in train if r["type"] == "LR"]
    assert lr == [held.replace("blue", "red")]
    # two LR train prompts are one more than the vocabulary has left
    rc = main(["--out", str(tmp_path / "x"), "--vocab", str(vocab), "--test-csv", str(test_csv), "--train", "12"])
    assert rc == 2 and not (tmp_path / "x" / "train.csv").exists()


def test_from_to_variant_keeps_the_rows_and_rephrases(tmp_path):
    plain = _run(tmp_path, "plain", "--train", "30", "--test", "12", "--seed", "1")
    variant = _run(tmp_path, "variant", "--train", "30", "--test", "12", "--seed", "1", "--variant", "from_to")
    for name in ("train.csv", "test.csv"):
        a, b = _read(plain / name), _read(variant / name)
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert {k: v for k, v in x.items() if k != "prompt"} == {k: v for k, v in y.items() if k != "prompt"}
            t = DSR_TYPES[x["type"]]
            origin = "from " + t.initial_phrase.removeprefix("on ")  # "from the left of"
            assert y["prompt"] != x["prompt"] and " is " not in y["prompt"].split(",")[-1]
            assert f" {origin} a {x['object']} {t.final_phrase} the {x['object']}." in y["prompt"]
            verb = parse_dsr_prompt(x["prompt"]).verb
            assert y["prompt"] == (f"{x['scene']}, a {x['animal']} {verb} {origin} a {x['object']} "
                                   f"{t.final_phrase} the {x['object']}.")
    # the published set rephrased too (the SPEC's own example sentence shape)
    out = _run(tmp_path, "pub", "--train", "6", "--test-csv", str(EVAL120), "--variant", "from_to")
    first = _read(out / "test.csv")[0]
    assert first["prompt_id"] == "1043_TL" and first["prompt"] == (
        "In a narrow hallway with a large window and a coat rack by the door, a squirrel jumps from the top of a "
        "box to the left of the box.")


def test_cli_refusals(tmp_path, capsys):
    out = _run(tmp_path, "out", "--train", "6", "--test", "6")
    before = (out / "train.csv").read_bytes()
    assert main(["--out", str(out), "--train", "12"]) == 2
    assert "already exist" in capsys.readouterr().err and (out / "train.csv").read_bytes() == before
    assert main(["--out", str(out), "--train", "12", "--test", "6", "--overwrite"]) == 0
    assert len(_read(out / "train.csv")) == 12

    vocab = _tiny_vocab(tmp_path, "animals: {cat: [walks]}\nobjects: [chair]\nscenes: [In a red room]\n")
    assert main(["--out", str(tmp_path / "big"), "--vocab", str(vocab), "--train", "6"]) == 2
    err = capsys.readouterr().err
    assert "makes 1 distinct prompts of each type" in err and "need 21" in err and "fewer prompts" in err
    assert not (tmp_path / "big" / "train.csv").exists()

    assert main(["--out", str(tmp_path / "y"), "--test", "6", "--test-csv", str(EVAL120)]) == 2
    assert "exclude each other" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["--out", str(tmp_path / "file" / "sub")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "z"), "--test-csv", str(tmp_path / "missing.csv")]) == 2
    assert "missing.csv" in capsys.readouterr().err


GOOD = {"animals": {"cat": ["walks"], "dog": ["runs"]}, "objects": ["chair", "box"], "scenes": ["In a room"]}


@pytest.mark.parametrize("change, words", [
    ({"objects": []}, ["objects is empty"]),
    ({"scenes": []}, ["scenes is empty"]),
    ({"animals": {}}, ["animals is empty"]),
    ({"animals": {"cat": []}}, ["animals.cat is empty", "verb"]),
    ({"objects": ["chair", "chair"]}, ["objects[1]", "'chair' appears twice"]),
    ({"animals": {"cat": ["walks", "walks"]}}, ["animals.cat[1]", "'walks' appears twice"]),
    ({"colours": ["red"]}, ["unknown key", "colours"]),
    ({"animals": {"cat": ["walks"]}, "objects": ["cat"]}, ["both animals and objects", "cat"]),
    ({"scenes": ["In a room,"]}, ["scenes[0]", "ends with ','"]),
    ({"objects": ["box, big"]}, ["objects[0]", "comma or period"]),
    ({"objects": "chair"}, ["objects must be a list"]),
])
def test_vocabulary_errors_name_the_key(change, words):
    with pytest.raises(VocabularyError) as e:
        parse_vocabulary({**GOOD, **change}, "v.yaml")
    for w in words:
        assert w in str(e.value)
    assert str(e.value).startswith("v.yaml")


def test_vocabulary_file_errors(tmp_path):
    with pytest.raises(VocabularyError, match="key 'cat' appears twice .lines 2 and 3"):
        load_vocabulary(_tiny_vocab(tmp_path, "animals:\n  cat: [walks]\n  cat: [runs]\nobjects: [a]\nscenes: [b]\n"))
    with pytest.raises(VocabularyError, match="missing key.*scenes"):
        load_vocabulary(_tiny_vocab(tmp_path, "animals: {cat: [walks]}\nobjects: [box]\n"))
    with pytest.raises(VocabularyError, match="not valid YAML"):
        load_vocabulary(_tiny_vocab(tmp_path, "animals: [\n"))
    with pytest.raises(VocabularyError, match="does not exist"):
        load_vocabulary(tmp_path / "nope.yaml")


def test_the_shipped_vocabulary_loads_and_is_documented():
    vocab = load_vocabulary()
    assert vocab.prompts_per_type() >= 1000 and len(vocab.scenes) >= 20
    text = DEFAULT_VOCABULARY.read_text()
    for key in ("animals", "objects", "scenes"):
        assert f"#   {key}" in text  # the header comment explains every key
    assert set(yaml.safe_load(text)) == {"animals", "objects", "scenes"}


def test_generate_refuses_an_unknown_variant():
    with pytest.raises(DatasetError, match="unknown variant"):
        generate(load_vocabulary(), num_train=6, num_test=6, variant="to_from")
