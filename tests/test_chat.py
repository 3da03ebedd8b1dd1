"""moejax.data.chat: the assistant-only loss mask, packing whole conversations, its one-line
errors, and a chat fine-tune of an imported checkpoint exported back (slow)."""

import glob
import json
import logging
import os
import re
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from safetensors import safe_open

from moejax.config_lib import ConfigError, check_data
from moejax.data import chat, store, text
from moejax.data.batches import make_batches

pytest.importorskip("tokenizers")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, "tests", "fixtures", "chat")
TOKENIZER = os.path.join(FIXTURE, "tokenizer")
CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "2 + 2 = 4."},
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "hi"}]


def data_cfg(path, seq_len=63, **kw):
    return ml_collections.ConfigDict(dict(source="files", format="chat", path=str(path),
                                          seq_len=seq_len, eval_fraction=0.0,
                                          tokenizer=TOKENIZER, on_error="skip", streaming=False)
                                     | kw)


def write_jsonl(path, conversations):
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    return path


def decode(tokenizer, ids):
    return tokenizer.tok.decode([int(i) for i in ids], skip_special_tokens=False)


def runs(mask):
    """[start, end) of each run of 1s."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    return list(zip(edges[::2], edges[1::2], strict=True))


def test_only_the_assistant_turns_carry_loss():
    tokenizer = text.make_tokenizer(TOKENIZER)
    tokens, mask = chat.render_and_mask(CHAT, chat.load_template(TOKENIZER), tokenizer)
    assert decode(tokenizer, tokens) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
        "<|im_start|>assistant\n2 + 2 = 4.<|im_end|>\n<|im_start|>user\nSay hi.<|im_end|>\n"
        "<|im_start|>assistant\nhi<|im_end|>\n")
    assert [decode(tokenizer, tokens[a:b]) for a, b in runs(mask)] == \
        ["2 + 2 = 4.<|im_end|>", "hi<|im_end|>"]


def test_end_of_turn_after_spaces_and_a_left_out_system_turn(tmp_path):
    """Llama 2's form: ' CONTENT </s>' (the space before the end of turn is supervised too),
    a template that drops system turns, and a token straddling the content's start."""
    shutil.copy(os.path.join(TOKENIZER, "tokenizer.json"), tmp_path)
    source = ("{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content }} [/INST]"
              "{% elif m.role == 'assistant' %} {{ m.content }} {{ eos_token }}{% endif %}"
              "{% endfor %}")
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": source, "eos_token": "<|im_end|>"}))
    tokenizer = text.make_tokenizer(str(tmp_path))
    tokens, mask = chat.render_and_mask(CHAT, chat.load_template(str(tmp_path)), tokenizer)
    assert decode(tokenizer, tokens) == ("[INST] What is 2 + 2? [/INST] 2 + 2 = 4. <|im_end|>"
                                         "[INST] Say hi. [/INST] hi <|im_end|>")
    assert [decode(tokenizer, tokens[a:b]) for a, b in runs(mask)] == \
        [" 2 + 2 = 4. <|im_end|>", "hi <|im_end|>"]  # " 2" is one token, "hi" follows " "


def test_render_as_apply_chat_template(tmp_path):
    """trim_blocks and lstrip_blocks (a template laid out on lines renders as the one-line
    one), bos_token from tokenizer_config.json, and tool turns where the template names them."""
    source = ("{{ bos_token }}{% for m in messages %}\n"
              "  {% if m.role == 'tool' %}\n<tool>{{ m.content }}</tool>\n"
              "  {% else %}\n{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>' }}\n"
              "  {% endif %}\n{% endfor %}\n")
    shutil.copy(os.path.join(TOKENIZER, "tokenizer.json"), tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": source, "bos_token": {"content": "<|endoftext|>"}}))
    template = chat.load_template(str(tmp_path / "tokenizer.json"))
    messages = CHAT[1:3] + [{"role": "tool", "content": "4"}]
    assert template.roles == ("system", "user", "assistant", "tool")
    assert chat.render(messages, template) == (
        "<|endoftext|><|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
        "<|im_start|>assistant\n2 + 2 = 4.<|im_end|>\n<tool>4</tool>\n")
    assert "tool" not in chat.load_template(TOKENIZER).roles


def test_pack_whole_conversations_greedily():
    lengths = [3, 4, 1, 6, 8]  # width 8: [3 4 1] [6 + padding] [8]
    convs = [(np.full(n, 10 + i), np.arange(n) % 2) for i, n in enumerate(lengths)]
    got = chat.pack(convs, seq_len=7)
    want_tokens = [[10, 10, 10, 11, 11, 11, 11, 12], [13] * 6 + [0, 0], [14] * 8]
    want_segments = [[1, 1, 1, 2, 2, 2, 2, 3], [1] * 6 + [0, 0], [1] * 8]
    want_mask = [[0, 1, 0, 0, 1, 0, 1, 0], [0, 1, 0, 1, 0, 1, 0, 0], [0, 1] * 4]
    assert got.dtype == np.int32 and got.shape == (3, 3, 8)
    np.testing.assert_array_equal(got, np.stack([want_tokens, want_segments, want_mask], 1))
    assert chat.pack([], seq_len=7).shape == (0, 3, 8)


def test_rows_split_whole_conversations_and_drop_long_ones(caplog):
    tokenizer, template = text.make_tokenizer(TOKENIZER), chat.load_template(TOKENIZER)
    cfg = data_cfg(os.path.join(FIXTURE, "chat.jsonl"), seq_len=47, eval_fraction=0.2)
    rendered = [decode(tokenizer, chat.render_and_mask(m, template, tokenizer)[0])
                for _, m in chat.read(cfg, template.roles)]
    with caplog.at_level(logging.WARNING, logger="moejax.data.chat"):
        split_rows = {s: chat.rows(cfg, tokenizer, s) for s in ("train", "eval")}
    seen = []
    for split, rows in split_rows.items():
        for tokens, segments, _ in rows:  # segments 1, 1, ..., 2, ..., k, then padding 0s
            real = segments[segments > 0]
            assert real[0] == 1 and set(np.diff(real)) <= {0, 1} and segments[len(real):].sum() == 0
            seen += [(decode(tokenizer, tokens[segments == s]), split)
                     for s in range(1, segments.max() + 1)]
    length = [len(tokenizer.tok.encode(r, add_special_tokens=False)) for r in rendered]
    want = [(r, "eval" if text.is_eval_doc(str(i), 0.2) else "train")
            for i, (r, n) in enumerate(zip(rendered, length, strict=True)) if n <= 48]
    assert sorted(seen) == sorted(want)  # each conversation whole, once, in its split
    assert {s for _, s in want} == {"train", "eval"} and len(want) < len(rendered)
    dropped = [int(n) for n in re.findall(r"dropped (\d+) of", caplog.text)]
    assert sum(dropped) == len(rendered) - len(want), caplog.text


def one_line_error(match, call, *args):
    with pytest.raises(ConfigError, match=match) as e:
        call(*args)
    assert "\n" not in str(e.value)


def test_one_line_errors(tmp_path):
    tokenizer = text.make_tokenizer(TOKENIZER)
    good = write_jsonl(tmp_path / "good.jsonl", [CHAT])
    for folder, template in (("bare", None), ("raising", "{{ raise_exception('no turns') }}"),
                             ("broken", "{% for %}")):
        (tmp_path / folder).mkdir()
        shutil.copy(os.path.join(TOKENIZER, "tokenizer.json"), tmp_path / folder)
        if template:
            (tmp_path / folder / "tokenizer_config.json").write_text(
                json.dumps({"chat_template": template}))
    for name, match in (("bare", "no chat template; allowed"), ("byte", "no chat template"),
                        ("raising", r"its chat template fails on .*good.jsonl:1 \(no turns\); "
                                    "allowed"),
                        ("broken", "its chat template does not compile")):
        path = name if name == "byte" else str(tmp_path / name)
        one_line_error(rf"^data.tokenizer='{path}': {match}", chat.rows, data_cfg(good),
                       text.make_tokenizer(path), "train")
    for role in ("robot", "tool"):  # tool: this template handles no tool turns
        f = write_jsonl(tmp_path / f"{role}.jsonl", [CHAT, [{"role": role, "content": "x"}]])
        one_line_error(rf"^data.path=.*{role}.jsonl:2: role '{role}' unknown; allowed: system, "
                       "user, assistant$", chat.rows, data_cfg(f), tokenizer, "train")
    for i, line in enumerate(["{not json", '{"text": "hi"}', '{"messages": []}',
                              '{"messages": [{"role": "user", "content": 3}]}']):
        f = tmp_path / f"bad{i}.jsonl"
        f.write_text(json.dumps({"messages": CHAT}) + "\n\n" + line + "\n")
        one_line_error(rf"^data.path=.*bad{i}.jsonl:3: not a conversation; allowed: one JSON "
                       "object a line", chat.rows, data_cfg(f), tokenizer, "train")
    one_line_error(r"^data.seq_len=8: all 1 train conversations .* \(the longest: \d+\); "
                   "allowed: data.seq_len >=", chat.rows, data_cfg(good, seq_len=8), tokenizer,
                   "train")
    for source, streaming in (("hub", False), ("files", True)):
        one_line_error("^data.format='chat': not with", check_data,
                       data_cfg(good, source=source, streaming=streaming, shuffle_buffer=0))
    check_data(data_cfg(good, shuffle_buffer=0))
    one_line_error("^data.format='chat': conversations are rendered and packed as a run opens",
                   store.prepare, data_cfg(good, shuffle_buffer=0),
                   str(tmp_path / "store"), 1)


def test_make_batches_gives_chat_rows():
    cfg = data_cfg(os.path.join(FIXTURE, "chat.jsonl"), seq_len=95, batch_size=4, mixture="",
                   documents=True)
    rows = make_batches(cfg, text.make_tokenizer(TOKENIZER), "train", 0).host_batches(
        slice(0, 4))[0]
    assert rows.shape == (4, 3, 96) and rows.dtype == np.int32
    assert rows[:, 2].sum() > 0 and set(np.unique(rows[:, 2])) == {0, 1}


def tensors(folder):
    out = {}
    for path in glob.glob(os.path.join(folder, "*.safetensors")):
        with safe_open(path, "np") as f:
            out.update({k: f.get_slice(k).get_shape() for k in f.keys()})
    return out


@pytest.mark.slow
def test_chat_fine_tune_of_an_import_exports(tmp_path):
    """qwen3_moe_top2 with the chat tokenizer beside it: imported, fine-tuned on chat.jsonl
    (the template travels in hf/) on another mesh, its loss falling; exported, and the export
    imports again."""
    src, work = str(tmp_path / "src"), str(tmp_path / "run")
    shutil.copytree(os.path.join(REPO, "tests", "fixtures", "hf", "qwen3_moe_top2"), src)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOKENIZER, name), src)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}

    def run(*args):
        done = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout + done.stderr

    # Converted onto fsdp = 8, fine-tuned on data = 2 x expert = 2: the restore reshards.
    run("moejax.convert", "from-hf", src, "--workdir", work, "--mesh", "fsdp=8")
    out = run("moejax.train", "--config", f"{work}/config.py", "--workdir", work,
              "--config.mesh.fsdp=1", "--config.mesh.data=2", "--config.mesh.expert=2",
              "--config.data.source=files", "--config.data.format=chat",
              f"--config.data.path={FIXTURE}/chat.jsonl", "--config.data.seq_len=63",
              "--config.data.batch_size=4", "--config.data.eval_fraction=0.2",
              "--config.train.steps=24", "--config.train.lr=3e-3",
              "--config.train.warmup_steps=2", "--config.train.log_every=4",
              "--config.train.eval_every=12", "--config.train.eval_batches=1",
              "--config.train.ckpt_every=24")
    assert "resumed from" in out and re.search(r"dropped \d+ of \d+ train conversations", out)
    evals = [float(v) for v in re.findall(r"eval loss ([\d.]+)", out)]
    assert len(evals) >= 2 and evals[-1] < evals[0] - 0.3, out[-3000:]
    run("moejax.convert", "to-hf", str(tmp_path / "out"), "--workdir", work)
    assert tensors(str(tmp_path / "out")) == tensors(src)
    with open(tmp_path / "out" / "tokenizer_config.json") as f:
        assert json.load(f)["chat_template"] == chat.load_template(TOKENIZER).source
    run("moejax.convert", "from-hf", str(tmp_path / "out"), "--workdir", str(tmp_path / "again"))
