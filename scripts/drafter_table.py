"""Print the README's table of drafters from the registry (tests check the README holds it as printed)."""

from tokenrecycle.drafters.registry import DRAFTERS


def drafter_table() -> str:
    rows = ["| drafter | what it does | needs |", "|---|---|---|"]
    for entry in DRAFTERS.values():
        needs = "a draft model (`--draft`)" if entry.needs_draft_model else "`--datastore` (optional)" if entry.uses_datastore else ""
        rows.append(f"| `{entry.name}` | {entry.description} | {needs} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(drafter_table())
