"""Merge statements learned in learn mode into a role's policy file (``pos-proxy policy approve``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from proxy.policy.learn import ReviewFileError, read_review, write_review
from proxy.yamlreader import load_yaml


class PolicyFileError(Exception):
    """The approval cannot be carried out; the text says why."""


@dataclass(frozen=True, slots=True)
class Approval:
    approved: int
    policy_file: Path


def approve_statements(
    review_file: Path, role: str, fingerprints: set[str] | None, policy_file: Path | None
) -> Approval:
    """Append the chosen learned statements of ``role`` to its policy and drop them from the review."""
    try:
        entries = read_review(review_file)
    except ReviewFileError as exc:
        raise PolicyFileError(str(exc)) from None
    chosen = [
        entry
        for entry in entries
        if entry.role == role and (fingerprints is None or entry.fingerprint in fingerprints)
    ]
    if not chosen:
        raise PolicyFileError(f"{review_file}: no learned statement of role {role} matches")
    if fingerprints is not None:
        unknown = fingerprints - {entry.fingerprint for entry in chosen}
        if unknown:
            raise PolicyFileError(
                f"{review_file}: role {role} learned no statement {', '.join(sorted(unknown))}"
            )
    target = policy_file or next((Path(entry.policy_file) for entry in chosen if entry.policy_file), None)
    if target is None:
        raise PolicyFileError(f"no policy file recorded for role {role}: pass --policy")
    try:
        document = load_yaml(target)
    except ValueError as exc:
        raise PolicyFileError(str(exc)) from None
    if not isinstance(document, dict):
        raise PolicyFileError(f"{target}: expected a mapping at the top level")
    approved = list(document.get("fingerprints") or [])
    known = {item.get("fingerprint") for item in approved if isinstance(item, dict)}
    for entry in chosen:
        if entry.fingerprint not in known:
            approved.append({"fingerprint": entry.fingerprint, "text": entry.text})
    document["fingerprints"] = approved
    # A comment-free rewrite: the policy's meaning is its keys, and the review is the audit trail.
    temporary = target.with_name(f".{target.name}.new")
    temporary.write_text(yaml.safe_dump(document, sort_keys=False, allow_unicode=True), encoding="utf-8")
    temporary.replace(target)
    remaining = [entry for entry in entries if entry not in chosen]
    write_review(review_file, remaining)
    return Approval(len(chosen), target)
