"""Chat fine-tuning data (data.format=chat): conversations in, rows supervised on the
assistant's turns out.

Each non-blank line of the files data.path matches is {"messages": [{"role", "content"}, ...]}.
A conversation is rendered as transformers' apply_chat_template renders it
(add_generation_prompt=False), with the chat template of the tokenizer_config.json (or
chat_template.jinja) beside data.tokenizer's tokenizer.json, and tokenized once. loss_mask is 1
on each assistant message's content tokens and on the token right after them when it is a
special token (the template's end of turn: ChatML's <|im_end|>); 0 on system, user and tool turns
and on the template's scaffolding (ChatML's "<|im_start|>assistant\\n"). Whole conversations are
packed greedily, in order, into rows of seq_len + 1 tokens: each its own segment 1, 2, ... in
its row, the rest of the row padding (token 0, segment 0, loss 0). A conversation is never
split: one longer than seq_len + 1 tokens is dropped and counted (a warning names how many);
if all of a split's are, a ConfigError. The held-out split takes whole conversations
(text.is_eval_doc of the conversation's index in the files, in order).
"""

import dataclasses
import datetime
import functools
import json
import logging
import os
import pathlib

import numpy as np

from moejax.config_lib import ConfigError, first_line
from moejax.data import text

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")  # and "tool" where the template names it
FORM = 'one JSON object a line, {"messages": [{"role": ROLE, "content": TEXT}, ...]}'


@dataclasses.dataclass(frozen=True)
class Template:
    source: str  # the jinja text
    special: dict  # bos_token, eos_token, ... as apply_chat_template passes them (set ones)
    roles: tuple


@functools.cache
def compiled(source: str):
    """The template as transformers compiles it: sandboxed, trim_blocks and lstrip_blocks."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = (  # transformers' own: no HTML escapes
        lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
            sort_keys=sort_keys))
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda f: datetime.datetime.now().strftime(f))
    return env.from_string(source)


def load_template(tokenizer_path: str) -> Template:
    """The chat template of the tokenizer_config.json (or chat_template.jinja) beside a
    tokenizer.json or in its folder."""
    folder = tokenizer_path if os.path.isdir(tokenizer_path) else os.path.dirname(tokenizer_path)

    def beside(name: str) -> str | None:  # nothing beside "byte" or a hub name
        path = pathlib.Path(folder, name)
        return path.read_text("utf-8") if os.path.exists(tokenizer_path) and path.is_file() \
            else None

    config = json.loads(beside("tokenizer_config.json") or "{}")
    source = config.get("chat_template") or beside("chat_template.jinja")
    if isinstance(source, list):  # named templates: the default one
        source = next((t["template"] for t in source if t.get("name") == "default"), None)
    if not isinstance(source, str) or not source:
        raise ConfigError(f"data.tokenizer={tokenizer_path!r}: no chat template; allowed with "
                          "data.format='chat': a tokenizer.json (or its folder) beside a "
                          "tokenizer_config.json with a chat_template, as an imported "
                          "checkpoint's hf/ folder has")
    try:
        compiled(source)
    except Exception as e:  # jinja2.TemplateSyntaxError
        raise ConfigError(f"data.tokenizer={tokenizer_path!r}: its chat template does not "
                          f"compile ({first_line(e)}); allowed: a jinja2 chat template") from None
    special = {k: v.get("content") if isinstance(v, dict) else v for k, v in config.items()
               if k in ("bos_token", "eos_token", "unk_token", "pad_token") and v}
    return Template(source, special, ROLES + (("tool",) if "tool" in source else ()))


def render(messages: list[dict], template: Template) -> str:
    return compiled(template.source).render(messages=messages, tools=None, documents=None,
                                            add_generation_prompt=False, **template.special)


def render_and_mask(messages: list[dict], template: Template, tokenizer):
    """(tokens [T] int32, loss_mask [T] int32) of one conversation. Each message's content is
    found in the rendered text in order (stripped, if the template strips it; an assistant's
    must be there, another may be left out). A token that overlaps an assistant's content
    counts as content, and so does the special token that ends the turn (after whitespace
    only, as Llama 2's ' </s>')."""
    rendered = render(messages, template)
    enc = tokenizer.tok.encode(rendered, add_special_tokens=False)
    ids = np.asarray(enc.ids, np.int32)
    starts, ends = np.asarray(enc.offsets, np.int64).reshape(-1, 2).T
    special = {i for i, t in tokenizer.tok.get_added_tokens_decoder().items() if t.special}
    mask = np.zeros(len(ids), np.int32)
    cursor = 0
    for n, m in enumerate(messages):
        content = m["content"]
        at = rendered.find(content, cursor)
        if at < 0:
            content = content.strip()
            at = rendered.find(content, cursor)
        if at < 0 and m["role"] == "assistant":
            raise ValueError(f"message {n} (assistant): its content is not in the rendered "
                             "text (the template rewrites it)")
        if at < 0:  # a turn the template leaves out (or rewrites): nothing to supervise
            continue
        cursor = at + len(content)
        if m["role"] == "assistant":
            mask[(starts < cursor) & (ends > at)] = 1
            after = end = int(np.searchsorted(starts, cursor))  # the end of turn, past spaces
            while end < len(ids) and ids[end] not in special and not rendered[
                    starts[end]:ends[end]].strip():
                end += 1
            if end < len(ids) and int(ids[end]) in special:
                mask[after:end + 1] = 1
    return ids, mask


def pack(conversations, seq_len: int, extra: int = 0) -> np.ndarray:
    """[n, 3 + extra, seq_len + 1] int32 (tokens, segments, loss_mask, then `extra` rows of
    per-token values, -1 where there are none) of (tokens, loss_mask) pairs, or (tokens,
    loss_mask, values [T, extra]) triples, of at most seq_len + 1 tokens each: greedily in
    order, a new row when the next does not fit."""
    width, placed, row, used = seq_len + 1, [], 0, 0
    for tokens, *_ in conversations:
        assert len(tokens) <= width, (len(tokens), width)
        if used + len(tokens) > width:
            row, used = row + 1, 0
        placed.append((row, used))
        used += len(tokens)
    out = np.zeros((row + 1 if placed else 0, 3 + extra, width), np.int32)
    out[:, 3:] = -1
    segment = 0
    for (tokens, mask, *values), (r, at) in zip(conversations, placed, strict=True):
        segment = 1 if at == 0 else segment + 1
        span = slice(at, at + len(tokens))
        out[r, 0, span], out[r, 1, span], out[r, 2, span] = tokens, segment, mask
        if values:
            out[r, 3:, at:at + len(values[0])] = np.asarray(values[0]).T
    return out


def read(cfg, roles: tuple) -> list[tuple[str, list[dict]]]:
    """(FILE:LINE, messages) of every conversation of data.path, in order; one ConfigError
    line for the first malformed line or unknown role."""
    out = []
    for f in text.readable_files(cfg):
        with open(f, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{f}:{n}"
                try:
                    messages = json.loads(line)["messages"]
                    ok = isinstance(messages, list) and messages and all(
                        isinstance(m, dict) and isinstance(m.get("role"), str)
                        and isinstance(m.get("content"), str) for m in messages)
                except (ValueError, TypeError, KeyError):
                    ok = False
                if not ok:
                    raise ConfigError(f"data.path={cfg.path!r}: {where}: not a conversation; "
                                      f"allowed: {FORM}")
                for m in messages:
                    if m["role"] not in roles:
                        raise ConfigError(f"data.path={cfg.path!r}: {where}: role "
                                          f"{m['role']!r} unknown; allowed: {', '.join(roles)}")
                out.append((where, messages))
    return out


def rows(cfg, tokenizer, split: str) -> np.ndarray:
    """The split's packed rows [n, 3, seq_len + 1] int32 (cfg: the config's data group)."""
    template = load_template(tokenizer.name)
    encoded = []
    for i, (where, messages) in enumerate(read(cfg, template.roles)):
        if text.is_eval_doc(str(i), cfg.eval_fraction) != (split == "eval"):
            continue
        try:
            encoded.append(render_and_mask(messages, template, tokenizer))
        except Exception as e:  # the template's raise_exception, or content it rewrites
            raise ConfigError(f"data.tokenizer={tokenizer.name!r}: its chat template fails on "
                              f"{where} ({first_line(e)}); allowed: conversations it renders"
                              ) from None
    return pack(whole(encoded, cfg, split, "conversation"), cfg.seq_len)


def whole(sequences: list, cfg, split: str, noun: str) -> list:
    """The `sequences` (tuples, tokens first) that fit a row of data.seq_len + 1 tokens: one
    longer is dropped, never split, and counted in a warning; if all are, a ConfigError."""
    width = cfg.seq_len + 1
    fits = [c for c in sequences if len(c[0]) <= width]
    if len(fits) < len(sequences):
        longest = max(len(c[0]) for c in sequences)
        where = (f"{split} {noun}s of data.path={cfg.path!r} longer than data.seq_len + 1 "
                 f"= {width} tokens (the longest: {longest})")
        if not fits:
            raise ConfigError(f"data.seq_len={cfg.seq_len}: all {len(sequences)} {where}; "
                              f"allowed: data.seq_len >= {longest - 1}, or shorter {noun}s")
        log.warning(f"data: dropped {len(sequences) - len(fits)} of {len(sequences)} {where}: "
                    f"a {noun} is never split")
    return fits
