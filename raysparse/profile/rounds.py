"""Re-anchoring rounds (`--rounds N` with `--database anchored`): search, re-centre the
database on the round's winner, search again.

Why: an anchored database is calibrated on the inputs its anchor's prune gives, so it
describes the model exactly only at the anchor; the further a profile moves from it, the
more its assembled layers see inputs they were not calibrated on. Re-centring on each
round's winner (chosen by the sequential prune's validation perplexity, as always) keeps
the search where its database is exact, like re-linearising an approximation. The anchor
of every round competes in that round's rescoring, so a round never ends worse on
validation than it started; the rounds stop early when the anchor wins (nothing better
nearby) and the answer is the best round's.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from raysparse.config import TrialConfig
from raysparse.paths import write_json_atomic
from raysparse.profile.driver import ProfileOptions, run_profile_search
from raysparse.profile.levels import same_ratios

logger = logging.getLogger(__name__)

# what run_profile_search writes to OUTPUT, copied up from the best round
OUTPUTS = ("best_profile.json", "anchor_profile.json", "profile.png")


def run_rounds(config: TrialConfig, options: ProfileOptions) -> dict[str, Any]:
    """One search, or `options.rounds` re-anchored ones in OUTPUT/round-K; returns the best
    round's record with a `rounds` summary (also OUTPUT/profile_search.json)."""
    if options.rounds == 1:
        return run_profile_search(config, options)
    out = Path(config.output)
    storage = options.storage or config.stats_cache or str(out / "layer_db")  # one database cache for all rounds
    start, rounds, best, known = options.start, [], None, []
    for number in range(1, options.rounds + 1):
        # known: every profile an earlier round pruned sequentially (this round's anchor among
        # them), so a profile is pruned once per search, not once per round that meets it
        record = run_profile_search(replace(config, output=str(out / f"round-{number}")),
                                    replace(options, start=start, rounds=1, storage=storage, known_rows=tuple(known)))
        known += [row for row in record["rescored"] if "val_ppl" in row]
        chosen = record["rescored"][0]
        converged = same_ratios(record["layer_ratios"], record["anchor"])
        rounds.append({"round": number, "anchor": record["anchor"], "anchor_name": record["start"]["name"],
                       "chosen": record["chosen"], "val_ppl": chosen["val_ppl"], "kl_pruned": chosen["kl_pruned"],
                       "layer_ratios": record["layer_ratios"], "converged": converged,
                       "database_s": record["database_s"], "start_s": record["start"]["s"],
                       "search_s": record["search_s"], "rescore_s": record["rescore_s"], "wall_s": record["wall_s"]})
        logger.info("round %d: %s chosen, validation perplexity %.4g%s", number, record["chosen"], chosen["val_ppl"],
                    " (the anchor: stopping)" if converged else "")
        if best is None or chosen["val_ppl"] < best[0]["rescored"][0]["val_ppl"]:
            best = (record, number)
        if converged:
            break
        start = str(out / f"round-{number}" / "best_profile.json")
    assert best is not None
    record, number = best
    for name in OUTPUTS:
        if (out / f"round-{number}" / name).exists():
            shutil.copyfile(out / f"round-{number}" / name, out / name)
    totals = {key: round(sum(r[key] for r in rounds), 3)
              for key in ("database_s", "start_s", "search_s", "rescore_s", "wall_s")}
    record = {**record, "rounds": rounds, "best_round": number, "rounds_total": totals,
              "options": {**record["options"], "rounds": options.rounds, "start": options.start}}
    write_json_atomic(out / "profile_search.json", record)
    return record
