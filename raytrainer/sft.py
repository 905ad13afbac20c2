"""Supervised fine-tuning on instruction data, on the same trainer, strategies, checkpoints and guardian as
pretraining: `jobs/sft.py`.

Instruction files are JSON Lines, one example per line, in either shape:
    {"instruction": "...", "response": "..."}                      (field names configurable)
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
A conversation is rendered with role headers; everything up to its last assistant message is the prompt,
that message the response. Only response tokens are learned (the `sft` objective: prompt positions get no
label), so the model learns to answer, not to write questions.
"""

from __future__ import annotations

import json
from pathlib import Path

from raytrainer.config import Config, ConfigError, LoraConfig, load_config

ROLES = ("system", "user", "assistant")


def render_chat(messages: list[dict], where: str) -> tuple[str, str]:
    """(prompt, response) of a conversation: role headers, the last assistant message as the response."""
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ConfigError(f"{where}: messages[{i}] must be {{\"role\": one of {list(ROLES)}, \"content\": text}}, "
                              f"got {json.dumps(m)[:120]}")
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise ConfigError(f"{where}: the conversation has no assistant message to learn")
    prompt = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages[:last]) + "<|assistant|>\n"
    return prompt, messages[last]["content"]


def write_examples(source: str | Path, out: str | Path, prompt_field: str = "instruction",
                   response_field: str = "response") -> int:
    """Normalise an instruction file into {"prompt", "response"} lines; returns the number of examples."""
    source, out = Path(source), Path(out)
    count = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with source.open() as src, out.open("w") as dst:
        for n, line in enumerate(src, 1):
            if not line.strip():
                continue
            where = f"{source}:{n}"
            try:
                record = json.loads(line)
            except ValueError as e:
                raise ConfigError(f"{where}: not JSON ({e})") from None
            if "messages" in record:
                prompt, response = render_chat(record["messages"], where)
            elif isinstance(record.get(prompt_field), str) and isinstance(record.get(response_field), str):
                prompt, response = record[prompt_field], record[response_field]
            else:
                raise ConfigError(f"{where}: expected 'messages', or the fields {prompt_field!r} and "
                                  f"{response_field!r} (set them with --prompt-field/--response-field); "
                                  f"it has {sorted(record)}")
            dst.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
            count += 1
    if count == 0:
        raise ConfigError(f"{source}: no examples")
    return count


def sft_config(start_from: str, data_path: str, preset: str | None = None, overrides: list[str] = (),
               lora: LoraConfig | None = None) -> Config:
    """The fine-tuning run's config: the model (and tokenizer) of `start_from` (run:<url>[@step], whose
    checkpoint holds them, or hf:<dir> with `preset` describing it), the sft objective on `data_path`,
    the weights of `start_from`, optionally LoRA; `overrides` last."""
    from raytrainer.config import to_dict
    from raytrainer.warm_start import RUN_PREFIX, split_source

    base = list(overrides)
    if start_from.startswith(RUN_PREFIX):
        from raytrainer.export import run_config

        url, step = split_source(start_from)
        source, _ = run_config(url, step)
        model = {k: v for k, v in to_dict(source.model).items() if k not in ("init_from", "lora")}
        pinned = [f"model={json.dumps(model)}", f"data.tokenizer={source.data.tokenizer}"]
    else:
        pinned = []
    lora_set = [f"model.lora={json.dumps(to_dict(lora))}"] if lora is not None else []
    return load_config(preset or "tiny", [*pinned, f"data.path={data_path}", "data.objective=sft",
                                          f"model.init_from={start_from}", *lora_set, *base])
