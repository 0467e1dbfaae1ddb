"""Secrets never live in a spec: find keys named like secrets and values that look like keys.

Works on the composed YAML node tree (``yaml.compose``) so every finding carries its line and
column. A finding names the environment variable to use instead and shows only a masked prefix of
the value, never the value itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

import yaml

SECRET_NAME_RE = re.compile(
    r"(^|_)(token|api_?key|apikey|password|passwd|secret|secret_key|access_key|private_key|"
    r"credentials?|auth|(hf|wandb|vast|hub)_key)($|_)"
)
# Keys whose values are legitimately long hex strings (git commits, image digests).
HEX_SAFE_KEYS = frozenset({"commit", "revision", "sha", "digest"})

# (pattern, what it looks like, the env var to use); searched inside the value.
VALUE_PATTERNS = [
    (re.compile(r"(?<![A-Za-z0-9])hf_[A-Za-z0-9]{20,}"), "a Hugging Face token", "HF_TOKEN"),
    (re.compile(r"(?<![A-Za-z0-9])gh[pousr]_[A-Za-z0-9]{20,}"), "a GitHub token", "GITHUB_TOKEN"),
    (re.compile(r"(?<![A-Za-z0-9])sk-[A-Za-z0-9_-]{20,}"), "an API secret key", "the provider's env var"),
]
# Bare hex keys: the whole value must be hex of one of these lengths.
HEX_KEYS = {
    40: ("a 40-hex key (a Weights & Biases API key looks like this)", "WANDB_API_KEY"),
    64: ("a 64-hex key (a Vast.ai API key looks like this)", "VAST_API_KEY"),
    32: ("a 32-hex key", "HF_TOKEN, WANDB_API_KEY or VAST_API_KEY"),
}
HEX_RE = re.compile(r"^[0-9a-fA-F]+$")


@dataclass(frozen=True)
class SecretFinding:
    line: int  # 1-based
    column: int  # 1-based
    path: str  # field path, e.g. "wandb.api_key"
    message: str


def scan(root: yaml.Node | None) -> list[SecretFinding]:
    """Every secret-looking key or value under ``root``, in document order."""
    if root is None:
        return []
    return list(_walk(root, ()))


def mask(value: str) -> str:
    """A few leading characters and an ellipsis: enough to recognise, useless to steal."""
    shown = 4 if len(value) >= 16 else 1
    return value[:shown] + "…"


def looks_secret(value: str) -> bool:
    """Whether a string value would be reported by :func:`scan` (so it must never be echoed)."""
    text = value.strip()
    if any(pattern.search(text) for pattern, _, _ in VALUE_PATTERNS):
        return True
    return len(text) in HEX_KEYS and bool(HEX_RE.match(text))


def env_var_for_name(path: tuple[str | int, ...]) -> str:
    """Which env var replaces a secret stored under this key path."""
    text = ".".join(str(p) for p in path).lower()
    if "wandb" in text:
        return "WANDB_API_KEY"
    if "vast" in text:
        return "VAST_API_KEY"
    if "hf" in text or "hugging" in text or "publish" in text:
        return "HF_TOKEN"
    return "HF_TOKEN, WANDB_API_KEY or VAST_API_KEY"


def _walk(node: yaml.Node, path: tuple[str | int, ...]) -> Iterator[SecretFinding]:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.value)
            child = path + (key,)
            if _looks_like_secret_name(key) and _has_value(value_node):
                yield SecretFinding(
                    key_node.start_mark.line + 1, key_node.start_mark.column + 1, _dotted(child),
                    f"secrets are never read from the spec: remove `{key}` and set "
                    f"{env_var_for_name(child)} in the environment instead",
                )
                continue
            yield from _walk(value_node, child)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            yield from _walk(item, path + (index,))
    elif isinstance(node, yaml.ScalarNode) and isinstance(node.value, str):
        finding = _value_finding(node, path)
        if finding is not None:
            yield finding


def _value_finding(node: yaml.ScalarNode, path: tuple[str | int, ...]) -> SecretFinding | None:
    value = node.value.strip()
    where = (node.start_mark.line + 1, node.start_mark.column + 1, _dotted(path))
    for pattern, what, env in VALUE_PATTERNS:
        match = pattern.search(value)
        if match:
            return SecretFinding(*where, _value_message(match.group(0), what, env))
    last_key = next((p for p in reversed(path) if isinstance(p, str)), "")
    if len(value) in HEX_KEYS and HEX_RE.match(value) and last_key.lower() not in HEX_SAFE_KEYS:
        what, env = HEX_KEYS[len(value)]
        if "wandb" in _dotted(path).lower():
            env = "WANDB_API_KEY"
        return SecretFinding(*where, _value_message(value, what, env))
    return None


def _value_message(secret: str, what: str, env: str) -> str:
    return (f"value {mask(secret)!r} looks like {what}; secrets are never read from the spec: "
            f"set {env} in the environment instead")


def _looks_like_secret_name(key: str) -> bool:
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", key)  # apiKey -> api_Key
    normal = re.sub(r"[^a-z0-9]+", "_", snake.lower())
    return bool(SECRET_NAME_RE.search(normal))


def _has_value(node: yaml.Node) -> bool:
    """An empty ``hf_token:`` leaks nothing; it is still reported, as an unknown key."""
    return not (isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null"))


def _dotted(path: tuple[str | int, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(root)"
