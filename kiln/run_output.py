"""What `kiln run` prints: the texts (one header line per prompt when there are several), or JSON."""

from __future__ import annotations

from typing import Any

from kiln.run_prompts import RunPrompt


def header(index: int, count: int, num_prompt_tokens: int) -> str:
    """The line that opens prompt `index`'s output on stdout."""
    return f"=== prompt {index + 1}/{count} ({num_prompt_tokens} tokens) ==="


def texts(prompts: list[RunPrompt], outs: list[Any]) -> str:
    """Each prompt's echo and generated text; several prompts (or image copies) each under a header."""
    shown = [prompts[min(i, len(prompts) - 1)].shown for i in range(len(outs))]
    if len(outs) == 1:
        return shown[0] + outs[0].text
    blocks = [
        f"{header(i, len(outs), len(o.prompt_token_ids))}\n{s}{o.text}" for i, (s, o) in enumerate(zip(shown, outs))
    ]
    return "\n".join(blocks)


def json_outputs(prompts: list[RunPrompt], outs: list[Any]) -> list[dict[str, Any]]:
    results = []
    for i, o in enumerate(outs):
        given = prompts[min(i, len(prompts) - 1)]  # --image --batch-size: copies of one prompt
        chat = {"messages": given.messages, "prompt": given.chat_text} if given.messages is not None else {}
        results.append(
            {
                "prompt": o.prompt,
                **chat,
                "prompt_token_ids": o.prompt_token_ids,
                "token_ids": o.token_ids,
                "text": o.text,
                "finish_reason": o.finish_reason,
                "stop_reason": o.stop_reason,
                "metrics": {k: round(v, 4) for k, v in o.metrics.items()},
            }
        )
    return results


def profile_table(profile: dict[str, float]) -> str:
    ms = {k: v * 1000 for k, v in profile.items() if k.endswith("_s")}
    return "\n".join(
        [
            f"profile ({int(profile['num_images'])} image(s), {int(profile['generated_tokens'])} generated tokens):",
            f"  preprocessing      {ms['preprocess_s']:9.1f} ms",
            f"  vision encoder     {ms['vision_s']:9.1f} ms",
            f"  LLM generate       {ms['generate_s']:9.1f} ms  "
            f"(time to first token {ms['time_to_first_token_s']:.1f} ms, {ms['per_token_s']:.2f} ms per token)",
            f"  tokenizer decode   {ms['decode_s']:9.1f} ms",
            f"  end to end         {ms['end_to_end_s']:9.1f} ms",
        ]
    )
