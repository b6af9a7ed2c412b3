"""Prompt templates v0..v6 of RPT (arXiv 2506.08007, appendix D, table 10) and prompt rendering.

Owns the instruction text wrapped around a context and :func:`render_prompt`, which optionally
passes it through the tokenizer's chat template (R1-Distill: ``<｜User｜>...<｜Assistant｜><think>\\n``).

The texts follow table 10 of the paper. Its typography is reproduced where it is part of the
prompt (v1/v2 really say ``\\\\boxed{}`` once, v4 carries three few-shot examples); the quotes of
v0 are typeset as ‘…’ in the paper and are plain ASCII quotes here. The paper trains with v0.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from megatron_rpt.config import ConfigError

__all__ = ["TEMPLATES", "render_instruction", "render_prompt", "render_chat"]

_NOTE = ("(note: the token may begin with a space, e.g., \\boxed{ para} or \\boxed{ =}; "
         "do not use \\text{})")

TEMPLATES: dict[str, str] = {
    "v0": (
        "Complete the given text under '### Context' by predicting the next token, and wrap it in "
        "'\\boxed{}'. Please reason step by step to find the most probable next token as the final "
        f"answer, and enclose it in \\boxed{{}} {_NOTE}.\n\n"
        "### Context\n{context}"
    ),
    "v1": (
        "Complete the given text under ### Context by predicting the next token, and wrap it in "
        "\\\\boxed{}. Please reason step by step to find the most probable next token as the final "
        f"prediction, and enclose it in \\boxed{{}} {_NOTE}.\n\n"
        "### Context\n```{context}```."
    ),
    "v2": (
        "You are a helpful assistant, good at predicting the next token for a given context.\n\n"
        "Now, please complete the given text under ### Context by predicting the next token, and "
        "wrap it in \\\\boxed{}. Please reason step by step to find the most probable next token, and "
        "enclose it in \\boxed{} (note: the token may begin with a space, e.g., \\boxed{ para} or "
        "\\boxed{ +=}; do not use \\text{}).\n\n"
        "### Context\n```{context}```."
    ),
    "v3": (
        "Complete the given text under ### Context by predicting the next token, list multiple "
        "potential tokens and select the most probable one as the final answer. Wrap your final "
        f"answer in \\boxed{{}} {_NOTE}.\n\n"
        "### Context\n```{context}```"
    ),
    "v4": (
        "Complete the given text under ### Context by predicting the next token, and wrap it in "
        "\\boxed{}. Please reason step by step to find the most probable next token as the final "
        "answer, and enclose it in \\boxed{}. Some examples:\n\n"
        "### Context\n\n```...(some omitted)...Matching calculations with 1990 valid combinations "
        "indicates the minimum value of \\( b \\) that fits all pre-requisites and restrictions for "
        "triangle formation and symmetry generates the efficient outcome:\n\n\\[\n\\boxed{1991^2}\n\\]"
        "\n\nIn``` The next token is \\boxed{ this}\n\n"
        "### Context\n\n```...Thus $2^{A}=\\left(2^{a}\\right)^{2}\\left(2^{3} \\right)=``` "
        "The next token is \\boxed{9}\n\n"
        "### Context\n\n```..., numerical exploration shows``` The next token is \\boxed{:\\n}\n\n"
        "Now, the context is:\n\n### Context\n\n```{context}```."
    ),
    "v5": (
        "Complete the given text under ### Context by predicting the next token, and wrap it in "
        "\\boxed{}. Please reason step by step to find the most probable next token as the final "
        f"answer, and enclose it in \\boxed{{}} {_NOTE}.\n\n"
        "### Context\n```{context}```."
    ),
    "v6": (
        "Complete the given text wrapped in ``` and ``` by predicting the next token, list multiple "
        "potential tokens and select the most probable one as the final prediction. Wrap your final "
        f"prediction in \\boxed{{}} {_NOTE}.\n\n"
        "The context is: ```{context}```, now please predict the next token."
    ),
    # Not from the paper: the bare context, for base models and toy tasks whose continuation is
    # itself the guess (rl.answer_format=raw; use with data.use_chat_template=false).
    "raw": "{context}",
}


def render_instruction(context: str, template: str = "v0") -> str:
    """The user message: template ``template`` with ``context`` inserted verbatim."""
    try:
        text = TEMPLATES[template]
    except KeyError:
        raise ValueError(f"data.template={template!r} is not one of {sorted(TEMPLATES)}") from None
    # str.replace, not str.format: the templates are full of LaTeX braces.
    return text.replace("{context}", context)


def render_prompt(context: str, tokenizer: PreTrainedTokenizerBase | None, template: str = "v0",
                  use_chat_template: bool = True) -> str:
    """The full prompt text given to the policy (tokenise it with ``add_special_tokens=False``).

    With ``use_chat_template`` the instruction becomes one user turn of the tokenizer's chat
    template with the generation prompt appended (for R1-Distill that opens ``<think>``).
    """
    return render_chat(render_instruction(context, template), tokenizer, use_chat_template)


def render_chat(instruction: str, tokenizer: PreTrainedTokenizerBase | None, use_chat_template: bool = True) -> str:
    """``instruction`` as one user turn of the tokenizer's chat template plus the generation prompt
    (or unchanged without ``use_chat_template``)."""
    if not use_chat_template:
        return instruction
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ConfigError("data.use_chat_template=true but the tokenizer has no chat template "
                          "(no chat_template.jinja / tokenizer_config.json chat_template); "
                          "set data.use_chat_template=false or use a tokenizer with a template")
    return tokenizer.apply_chat_template([{"role": "user", "content": instruction}],
                                         add_generation_prompt=True, tokenize=False)
