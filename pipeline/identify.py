"""Identify which series of a session is the pre-contrast T1, post-contrast T1, T2 and T2-FLAIR.

Every series is scored against the rule table in identify_rules.py: header and physics first (a name adds
confidence but never gives a role the physics contradicts, so de-identified data without SeriesDescription or
ProtocolName score alike). When two or more T1s remain and no header records a contrast agent, the images decide
which is post-contrast (pipeline.contrast), or the run stops and asks. Each role then gets exactly one chosen
series (the best-quality candidate) when any exists. Every decision carries the reasons behind it, in words
a technologist can check against the scanner protocol. A series the user pinned to a role
(`PipelineConfig.role_overrides`) takes that role whatever the rules said; the other roles are then chosen as
usual among the series not pinned.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import tempfile
from pathlib import Path

import SimpleITK as sitk

from pedseg.pipeline import contrast
from pedseg.pipeline.config import PipelineConfig
from pedseg.pipeline.convert import convert_series
from pedseg.pipeline.errors import InputError, MissingSequenceError, PipelineError
from pedseg.pipeline.identify_rules import (
    NAMES,
    OTHER,
    PHYSICS,
    REJECT,
    ROLE_NAMES,
    RULES,
    Facts,
    Rule,
    clean_agent,
    normalise_text,
    same_protocol,
)
from pedseg.pipeline.types import ROLES, Identification, Series, SeriesDecision, SeriesHeader, Session

logger = logging.getLogger(__name__)

# A series needs more evidence than this for any role; below it, it is "other". Also the "other" logit in
# the confidence softmax, so a series with little evidence gets a low confidence.
OTHER_PRIOR = 1.5
# A post-contrast repeat comes at least an injection after the pre-contrast scan; reconstructions of one
# acquisition (e.g. filtered and unfiltered) share its acquisition time and are not pre/post pairs.
TWIN_MIN_GAP_S = 120.0


def identify(session: Session, config: PipelineConfig) -> Identification:
    """Classify every series; raise MissingSequenceError when a role is missing and the policy is "fail"."""
    identification = classify_session(session, config.reference_role, config.role_overrides)
    if identification.contrast_unresolved:
        raise MissingSequenceError(identification.contrast_unresolved, hint=_CONTRAST_HINT)
    if identification.missing and config.missing_policy != "allow":
        raise MissingSequenceError(_missing_message(identification), hint=_MISSING_HINT)
    return identification


def classify_session(session: Session, reference: str = "t1c",
                     pins: tuple[tuple[str, str], ...] = ()) -> Identification:
    """Classify every series and choose one per role, never raising for missing roles. `reference`: the role
    asked for as the reference series (see `reference_role`); `pins`: (role, SERIES) pairs the user pinned
    (`PipelineConfig.role_overrides`), an InputError when one does not name exactly one usable series."""
    facts = session_facts([s.header for s in session.series])
    decisions = [_decide(facts[s.header.key]) for s in session.series]
    pinned = _apply_pins(pins, decisions, facts)
    from_images = None if {"t1n", "t1c"} & set(pinned) else _contrast_from_images(session, decisions, facts)
    chosen = _choose(decisions, {s.header.key: s.header for s in session.series}, pinned)
    missing = [role for role in ROLES if role not in chosen]
    for d in decisions:
        logger.debug("%s → %s (confidence %.2f%s)", d.label, d.role, d.confidence, ", chosen" if d.chosen else "")
    if missing:
        logger.warning("no series found for: %s", ", ".join(ROLE_NAMES[r] for r in missing))
    identification = Identification(decisions=decisions, chosen=chosen, missing=missing,
                                    reference_role=reference_role(reference, chosen),
                                    pinned={role: d.key for role, d in pinned.items()})
    if from_images is not None:
        call, unresolved = from_images
        identification.contrast_from_images = call.reasons
        identification.contrast_confidence = call.confidence
        identification.contrast_unresolved = unresolved
    return identification


def reference_role(requested: str, chosen: dict[str, str]) -> str:
    """The role every other series is registered to and whose grid the native label map and the DICOM SEG take:
    the requested one when the session has it, else t1c, else the first role chosen (a run allowed to miss
    sequences). The one place this is decided."""
    if requested in chosen or not chosen:
        return requested
    fallback = "t1c" if "t1c" in chosen else next(iter(chosen))
    logger.warning("the reference series asked for, %s, is not in this session: %s is the reference instead",
                   ROLE_NAMES[requested], ROLE_NAMES[fallback])
    return fallback


def session_to_json(identification: Identification) -> str:
    """Deterministic JSON of an identification, for `pedseg identify INPUT --json`.

    `part` is null for a whole series, else the stack of a split series ('e2', 'cor'); `chosen` maps each role
    to its series key: the SeriesInstanceUID, or 'SeriesInstanceUID#part'; `pinned` maps the roles the user
    pinned by hand to their series key ({} when none).
    """
    series = [
        {
            "SeriesInstanceUID": d.series_uid,
            "part": d.part or None,
            "SeriesNumber": d.series_number,
            "SeriesDescription": d.description,
            "role": d.role,
            "confidence": round(d.confidence, 3),
            "reasons": list(d.reasons),
            "chosen": d.chosen,
            "names_available": d.names_available,
            "decided_by": d.decided_by,
            "contrast_decided_by": d.contrast_decided_by or None,
        }
        for d in sorted(identification.decisions, key=_decision_order)
    ]
    payload = {"series": series, "chosen": dict(identification.chosen), "missing": list(identification.missing),
               "pinned": dict(identification.pinned)}
    if identification.contrast_from_images:
        payload["contrast_from_images"] = {
            "reasons": list(identification.contrast_from_images),
            "confidence": round(identification.contrast_confidence, 3),
            "unresolved": identification.contrast_unresolved or None}
    return json.dumps(payload, indent=2, sort_keys=True, ensure_ascii=False)


# ------------------------------------------------------------------------------------------- facts


def header_facts(h: SeriesHeader) -> Facts:
    """What one series' header says by itself, before the session-wide relations (contrast timeline, repeats)."""
    return Facts(
        h=h,
        description=normalise_text(h.description),
        protocol=normalise_text(h.protocol),
        tr=h.repetition_time or None,
        te=h.echo_time or None,
        ti=h.inversion_time or None,
        flip=h.flip_angle,
        seq=frozenset(t.upper() for t in h.scanning_sequence),
        variant=frozenset(t.upper() for t in h.sequence_variant),
        image_type=tuple(t.upper() for t in h.image_type),
        agent=clean_agent(h.contrast_agent, h.contrast_ingredient),
        agent_informative=True,
        after_agent=None,
        before_agent=None,
        earlier_twin=None,
        twin_minutes=None,
        echo_times=h.echo_times or ((h.echo_time,) if h.echo_time else ()),
        names_available=bool(h.description.strip() or h.protocol.strip() or h.sequence_name.strip()),
    )


def session_facts(headers: list[SeriesHeader]) -> dict[str, Facts]:
    """Facts per series, with the relations that need the whole session (contrast timeline, repeats)."""
    basic = {h.key: header_facts(h) for h in headers}
    # An agent written on every series (typed in once at registration) does not tell pre from post.
    informative = len(headers) < 2 or not all(f.agent for f in basic.values())
    timed = sorted((h for h in headers if h.acquisition_time is not None), key=lambda h: h.acquisition_time)
    with_agent = [h for h in timed if basic[h.key].agent]
    candidates = [h for h in timed if not _rejections(basic[h.key])]
    # The echoes of a split multi-echo series are its parts: together they show a field map's echo pair.
    echoes: dict[str, set[float]] = {}
    for f in basic.values():
        echoes.setdefault(f.h.series_uid, set()).update(f.echo_times)
    facts = {}
    for h in headers:
        f = dataclasses.replace(basic[h.key], agent_informative=informative,
                                echo_times=tuple(sorted(echoes[h.series_uid])))
        t = h.acquisition_time
        if t is not None:
            f = dataclasses.replace(
                f,
                after_agent=next((a for a in with_agent if a.acquisition_time < t), None),
                before_agent=next((a for a in with_agent if a.acquisition_time > t), None),
            )
            twin = next((c for c in candidates if t - c.acquisition_time >= TWIN_MIN_GAP_S and same_protocol(c, h)),
                        None)
            if twin is not None and not _rejections(f):
                f = dataclasses.replace(f, earlier_twin=twin, twin_minutes=(t - twin.acquisition_time) / 60)
        facts[h.key] = f
    return facts


# ---------------------------------------------------------------------------------------- scoring


def _fired(f: Facts) -> list[tuple[Rule, str]]:
    return [(rule, hit) for rule in RULES if (hit := rule.predicate(f))]


def _rejections(f: Facts) -> list[tuple[Rule, str]]:
    return [(rule, hit) for rule in RULES if rule.weights is REJECT and (hit := rule.predicate(f))]


def _reason(rule: Rule, hit: str, f: Facts) -> str:
    return rule.reason.format(f=f, hit=hit)


def _decide(f: Facts) -> SeriesDecision:
    h = f.h
    fired = _fired(f)
    rejected = [(rule, hit) for rule, hit in fired if rule.weights is REJECT]
    if rejected:
        # Header and physics reasons first: they hold whatever the names say.
        rejected.sort(key=lambda item: item[0].kind == NAMES)
        return _decision(f, OTHER, 1.0, [_reason(rule, hit, f) for rule, hit in rejected], rejected[0][0].kind)
    evidence = [(rule, hit) for rule, hit in fired if rule.weights is not REJECT]
    scores = {role: sum(rule.weights.get(role, 0.0) for rule, _ in evidence) for role in ROLES}
    best = max(ROLES, key=lambda role: scores[role])  # max keeps the first of equals: deterministic
    probabilities = _softmax({**scores, OTHER: OTHER_PRIOR})
    if scores[best] <= OTHER_PRIOR:
        seen = [f"weak evidence: {_reason(rule, hit, f)}" for rule, hit in evidence]
        summary = f"not recognised as T1, T2 or FLAIR ({f.timing}; description '{h.description}')"
        return _decision(f, OTHER, probabilities[OTHER], [summary, *seen], _strongest_kind(evidence, OTHER))
    against = [(rule, hit) for rule, hit in evidence if rule.kind == PHYSICS and rule.weights.get(best, 0.0) < 0]
    if _kind_total(evidence, best, PHYSICS) < 0 and _kind_total(evidence, best, NAMES) > 0:
        names = "; ".join(_reason(rule, hit, f) for rule, hit in evidence if rule.kind == NAMES)
        physics_says = "; ".join(_reason(rule, hit, f) for rule, hit in against)
        return _decision(f, OTHER, probabilities[OTHER],
                         [f"the name suggests {ROLE_NAMES[best]} ({names}), but the physics contradicts it: "
                          f"{physics_says}; a name alone never decides"], PHYSICS)
    decision = _decision(f, best, probabilities[best], _role_reasons(best, evidence, f),
                         _strongest_kind(evidence, best))
    if best in ("t1n", "t1c"):
        decision.contrast_decided_by = _contrast_kind(evidence, best)
    return decision


def _kind_total(evidence: list[tuple[Rule, str]], role: str, kind: str) -> float:
    return sum(rule.weights.get(role, 0.0) for rule, _ in evidence if rule.kind == kind)


def _strongest_kind(evidence: list[tuple[Rule, str]], role: str) -> str:
    """What decided `role`: the kind of evidence that added most to it, names only when the role would not stand
    without them (for "other": the kind of evidence seen at all)."""
    if role == OTHER:
        return evidence[0][0].kind if evidence else ""
    without_names = [(rule, hit) for rule, hit in evidence if rule.kind != NAMES]
    scores = {r: sum(rule.weights.get(r, 0.0) for rule, _ in without_names) for r in ROLES}
    stands = max(ROLES, key=lambda r: scores[r]) == role and scores[role] > OTHER_PRIOR
    totals = {rule.kind: _kind_total(evidence, role, rule.kind) for rule, _ in (without_names if stands else evidence)}
    return max(totals, key=lambda kind: totals[kind]) if totals else ""


def _contrast_kind(evidence: list[tuple[Rule, str]], role: str) -> str:
    """What told a T1 pre- from post-contrast: the kind of evidence that pushed it furthest towards `role` rather
    than the other T1 role, names only when the rest does not already point that way."""
    other = "t1c" if role == "t1n" else "t1n"
    margins: dict[str, float] = {}
    for rule, _ in evidence:
        margins[rule.kind] = margins.get(rule.kind, 0.0) + rule.weights.get(role, 0.0) - rule.weights.get(other, 0.0)
    if sum(m for kind, m in margins.items() if kind != NAMES) > 0:
        margins.pop(NAMES, None)
    positive = {kind: m for kind, m in margins.items() if m > 0}
    return max(positive, key=lambda kind: positive[kind]) if positive else ""


def _role_reasons(role: str, evidence: list[tuple[Rule, str]], f: Facts) -> list[str]:
    """Reasons for, then against, the chosen role; strongest first, table order among equals."""
    relevant = [(rule, hit) for rule, hit in evidence if rule.weights.get(role, 0.0)]
    ordered = sorted(relevant, key=lambda item: -item[0].weights[role])
    return [("" if rule.weights[role] > 0 else "against: ") + _reason(rule, hit, f) for rule, hit in ordered]


def _softmax(scores: dict[str, float]) -> dict[str, float]:
    top = max(scores.values())
    exps = {k: math.exp(v - top) for k, v in scores.items()}
    total = sum(exps.values())
    return {k: v / total for k, v in exps.items()}


def _decision(f: Facts, role: str, confidence: float, reasons: list[str], decided_by: str) -> SeriesDecision:
    h = f.h
    return SeriesDecision(series_uid=h.series_uid, series_number=h.series_number, description=h.description,
                          role=role, confidence=float(confidence), reasons=reasons, part=h.part,
                          names_available=f.names_available, decided_by=decided_by)


# ------------------------------------------------------------------------------- contrast from images

# Rules whose evidence is a recorded contrast agent (or its position in the session): when one fires on a T1,
# the header has said which T1 is post-contrast and the images are not needed.
_AGENT_RULES = frozenset({"contrast_agent", "flavour_post", "flavour_pre", "after_agent", "before_agent"})


def _contrast_from_images(session: Session, decisions: list[SeriesDecision],
                          facts: dict[str, Facts]) -> tuple[contrast.ContrastCall, str] | None:
    """Two or more T1s acquired at least an injection apart, none of whose headers records an agent: decide from
    the images which one is post-contrast (pipeline.contrast), relabel them, and return the call with the reason
    it could not be made ("" when it was). None when the images are not needed or not available."""
    series = {s.header.key: s for s in session.series}
    t1s = sorted((d for d in decisions if d.role in ("t1n", "t1c")),
                 key=lambda d: series[d.key].header.acquisition_time or 0.0)
    if len(t1s) < 2 or any(_AGENT_RULES & {r.name for r, _ in _fired(facts[d.key])} for d in t1s):
        return None
    if any(not series[d.key].files or series[d.key].header.acquisition_time is None for d in t1s):
        return None
    first = t1s[0]
    later = [d for d in t1s[1:] if series[d.key].header.acquisition_time
             - series[first.key].header.acquisition_time >= TWIN_MIN_GAP_S]
    if not later:
        return None
    try:
        with tempfile.TemporaryDirectory(prefix="pedseg-contrast-") as tmp:
            base = _read(series[first.key], Path(tmp))
            calls = [_contrast_call(first, d, base, series[d.key], facts, Path(tmp)) for d in later]
    # The images are extra evidence: when they cannot be converted or registered (too few slices, a conversion
    # the preprocessing stage will report itself), the header's decision stands, and says so.
    except (PipelineError, RuntimeError, ValueError) as exc:
        logger.warning("T1 images not compared for contrast (%s): the header's decision stands", exc)
        for d in t1s:
            d.reasons.append(f"the T1 images could not be compared for contrast ({exc}); header evidence only")
        return None
    by_key = {d.key: d for d in t1s}
    # Each later T1 was compared with the first. Every one the images confidently call post-contrast is a t1c
    # candidate (an axial spin echo and a 3D T1 after one injection are both post-contrast); the first is post-
    # contrast only when the confident calls all say so. No confident call, or calls that disagree: ask the user.
    confident = [c for c in calls if c.confidence >= contrast.MIN_CONFIDENCE]
    first_post = {c.post == first.key for c in confident}
    if not confident or len(first_post) > 1:
        call = max(calls, key=lambda c: c.confidence)
        why = ("are not clear enough" if not confident else "contradict each other")
        message = (f"Cannot tell which T1 is post-contrast: no header records a contrast agent, and the images "
                   f"of the T1 series {why} (best: {by_key[call.post].label} against {by_key[call.pre].label}, "
                   f"confidence {call.confidence:.2f}, {contrast.MIN_CONFIDENCE:g} needed): "
                   + "; ".join(call.reasons) + ".")
        for d in t1s:
            d.reasons.append("post-contrast or not is undecided: " + message)
        logger.warning("%s", message)
        return call, message
    posts = {c.post for c in confident}
    for c in calls:
        if c not in confident:
            by_key[c.post].reasons.append(f"the images lean post-contrast against {by_key[c.pre].label} only with "
                                          f"confidence {c.confidence:.2f}: left pre-contrast")
    for c in confident:
        for d, post in ((by_key[c.post], True), (by_key[c.pre], False)):
            if post == (d.key in posts):
                d.role, d.contrast_decided_by = ("t1c" if post else "t1n"), "images"
                d.confidence = c.confidence
                other = by_key[c.pre if post else c.post]
                d.reasons.insert(0, ("post-contrast" if post else "pre-contrast") + " from the images, confidence "
                                 f"{c.confidence:.2f}, compared with {other.label}: " + "; ".join(c.reasons))
    for d in t1s:
        if d.key not in posts and d.role == "t1c":  # a name or a repeat made it t1c; the images did not agree
            d.role, d.contrast_decided_by = "t1n", "images"
    call = max(confident, key=lambda c: c.confidence)
    logger.info("post-contrast T1 from the images: %s (confidence %.2f)",
                ", ".join(by_key[k].label for k in sorted(posts)), call.confidence)
    return call, ""


def _contrast_call(first: SeriesDecision, other: SeriesDecision, base: sitk.Image, series: Series,
                   facts: dict[str, Facts], tmp: Path) -> contrast.ContrastCall:
    same_frame = facts[first.key].h.frame_of_reference_uid == series.header.frame_of_reference_uid
    evidence = contrast.enhancement(base, _read(series, tmp), same_frame=same_frame)
    names = tuple(any(r.name == "text_post" for r, _ in _fired(facts[d.key])) for d in (first, other))
    return contrast.decide(first.key, other.key, evidence, names=names)


def _read(series: Series, tmp: Path) -> sitk.Image:
    return sitk.ReadImage(str(convert_series(series, tmp)), sitk.sitkFloat32)


# ---------------------------------------------------------------------------------------- ranking


def _choose(decisions: list[SeriesDecision], headers: dict[str, SeriesHeader],
            pinned: dict[str, SeriesDecision] | None = None) -> dict[str, str]:
    """Mark the best series of each role chosen, or the one the user pinned; tell each runner-up why it lost.
    A pinned series is a candidate for its pinned role only."""
    pinned = pinned or {}
    chosen = {}
    for role in ROLES:
        candidates = sorted((d for d in decisions if d.role == role and not d.pinned),
                            key=lambda d: _quality_key(headers[d.key], role))
        if role in pinned:
            winner = pinned[role]
            winner.chosen = True
            chosen[role] = winner.key
            for loser in candidates:
                loser.reasons.append(f"not chosen: {winner.label} is pinned to {ROLE_NAMES[role]} by the user")
            continue
        if not candidates:
            continue
        winner = candidates[0]
        winner.chosen = True
        chosen[role] = winner.key
        for loser in candidates[1:]:
            loser.reasons.append(_lost_because(headers[winner.key], headers[loser.key], role))
    return chosen


def _apply_pins(pins: tuple[tuple[str, str], ...], decisions: list[SeriesDecision],
                facts: dict[str, Facts]) -> dict[str, SeriesDecision]:
    """Give each pinned series its pinned role, after the automatic decisions; role -> the pinned decision."""
    pinned: dict[str, SeriesDecision] = {}
    for role, series in pins:
        if role not in ROLES:
            raise InputError(f"Role override {role}={series}: unknown role '{role}'.",
                             hint="Roles: " + ", ".join(ROLE_NAMES.values()) + ".")
        if role in pinned:
            raise InputError(f"Role override pins {ROLE_NAMES[role]} twice.", hint="Pin each role to one series.")
        d = _pinned_series(role, series, decisions)
        earlier = next((r for r, other in pinned.items() if other is d), None)
        if earlier is not None:
            raise InputError(f"Role override pins {d.label} to two roles: {ROLE_NAMES[earlier]} and "
                             f"{ROLE_NAMES[role]}.", hint="A series can take one role only; pin another series.")
        rejected = _rejections(facts[d.key])
        if rejected:
            why = "; ".join(_reason(rule, hit, facts[d.key]) for rule, hit in rejected)
            raise InputError(f"Role override {role}={series}: {d.label} cannot be used as {ROLE_NAMES[role]}: "
                             f"{why}.", hint="Pin a series that holds the sequence itself (not a localizer, a "
                                             "derived or reformatted copy, diffusion or other unusable series).")
        automatic = f"{d.role}, confidence {d.confidence:.2f}"
        d.reasons = [f"pinned by the user to {ROLE_NAMES[role]} (automatic identification: {automatic})",
                     *d.reasons]
        d.role, d.confidence, d.pinned = role, 1.0, True
        d.decided_by, d.contrast_decided_by = "user", ""
        pinned[role] = d
        logger.info("%s pinned by the user to %s (automatic: %s)", d.label, ROLE_NAMES[role], automatic)
    return pinned


def _pinned_series(role: str, series: str, decisions: list[SeriesDecision]) -> SeriesDecision:
    """The one series a pin's SERIES names: its series key ('UID' or 'UID#part'), its SeriesInstanceUID, or its
    SeriesNumber."""
    text = series.strip()
    matches = [d for d in decisions if d.key == text]
    if not matches:
        matches = [d for d in decisions if d.series_uid == text]
    if not matches and text.lstrip("+-").isdigit():
        matches = [d for d in decisions if d.series_number == int(text)]
    available = "; ".join(d.label for d in sorted(decisions, key=_decision_order)) or "none"
    if not matches:
        raise InputError(f"Role override {role}={series}: no series of this session has SeriesNumber or "
                         f"SeriesInstanceUID '{series}'. Series in the session: {available}.",
                         hint="Give the SeriesNumber or SeriesInstanceUID of one of them (`pedseg identify INPUT` "
                              "lists them).")
    if len(matches) > 1:
        listed = "; ".join(f"{d.label}: {d.key}" for d in sorted(matches, key=_decision_order))
        raise InputError(f"Role override {role}={series} matches {len(matches)} series: {listed}.",
                         hint="Give the SeriesInstanceUID instead (with '#part' for one part of a split series), "
                              f"e.g. {role}={matches[0].key}.")
    return matches[0]


def _voxel(h: SeriesHeader) -> tuple[float, float, float] | None:
    if h.pixel_spacing is None or not h.slice_thickness:
        return None
    return (round(h.pixel_spacing[0], 2), round(h.pixel_spacing[1], 2), round(h.slice_thickness, 2))


def _quality_key(h: SeriesHeader, role: str) -> tuple:
    """3D first, then finer voxels (coarsest edge, then volume), more images, for t1c the latest, then number."""
    voxel = _voxel(h)
    latest = -(h.acquisition_time or 0.0) if role == "t1c" else 0.0
    return (
        h.mr_acquisition_type != "3D",
        max(voxel) if voxel else math.inf,
        math.prod(voxel) if voxel else math.inf,
        -h.num_images,
        latest,
        h.series_number if h.series_number is not None else math.inf,
        h.key,
    )


def _lost_because(winner: SeriesHeader, loser: SeriesHeader, role: str) -> str:
    advantages = []
    if winner.mr_acquisition_type == "3D" and loser.mr_acquisition_type != "3D":
        advantages.append(f"3D (this one is {loser.mr_acquisition_type or 'not 3D'})")
    wv, lv = _voxel(winner), _voxel(loser)
    if wv and (not lv or (max(wv), math.prod(wv)) < (max(lv), math.prod(lv))):
        advantages.append(f"finer voxels ({_voxel_text(wv)} vs {_voxel_text(lv)})")
    if winner.num_images > loser.num_images:
        advantages.append(f"more complete ({winner.num_images} vs {loser.num_images} images)")
    if role == "t1c" and (winner.acquisition_time or 0.0) > (loser.acquisition_time or 0.0):
        minutes = (winner.acquisition_time - (loser.acquisition_time or 0.0)) / 60
        advantages.append(f"acquired later ({minutes:.0f} min after this one), so contrast had longer to enhance")
    if not advantages and winner.series_uid == loser.series_uid:
        advantages.append("equal quality, and it is the first part of the same series")
    elif not advantages:
        advantages.append("equal quality, and it has the lower series number")
    return f"not chosen: {winner.label} is preferred for {ROLE_NAMES[role]}: " + "; ".join(advantages)


def _voxel_text(voxel: tuple[float, float, float] | None) -> str:
    return " × ".join(f"{v:g}" for v in voxel) + " mm" if voxel else "unknown voxel size"


# ------------------------------------------------------------------------------------------ output


def _decision_order(d: SeriesDecision) -> tuple:
    return (d.series_number is None, d.series_number or 0, d.series_uid, d.part)


_MISSING_HINT = (
    "If the sequence was acquired, include it in the input (export the whole MRI session). If it is in the "
    "input but was not recognised, compare its description and timing with the reasons shown by "
    "`pedseg identify INPUT`, and report the series so the rules can learn it."
)


_CONTRAST_HINT = (
    "Say which series is the post-contrast T1: `--role t1c=SERIES` (its SeriesNumber or SeriesInstanceUID, as "
    "`pedseg identify INPUT` lists them), or keep the ContrastBolusAgent attribute when the data are exported."
)


def _missing_message(identification: Identification) -> str:
    missing = ", ".join(ROLE_NAMES[r] for r in identification.missing)
    seen = "; ".join(_seen_line(d) for d in sorted(identification.decisions, key=_decision_order))
    return f"Required sequence(s) missing: {missing}. Series seen: {seen or 'none'}."


def _seen_line(d: SeriesDecision) -> str:
    line = f"{d.label} → {d.role}"
    if d.role == OTHER and d.reasons:
        line += f" ({d.reasons[0]})"
    elif not d.chosen:
        line += " (not chosen)"
    return line
