"""The population guard: a model bundle declares who its models were trained on (`ModelBundle.population`); a
child's study segmented by a bundle not trained on children gets one warning, worded here and nowhere else. The
runner logs it, and the report's first page, measurements.json and the gear's QC result carry it."""
from __future__ import annotations

import math

from pedseg.pipeline.bundle import Population
from pedseg.pipeline.types import PopulationWarning

ADULT_AGE_YEARS = 18.0  # patients younger than this are children
CHILDREN_COVERED: frozenset[Population] = frozenset({"pediatric", "adult-and-pediatric"})
# Who the bundle's models learnt from, as the warning's first clause says it.
TRAINED_ON: dict[Population, str] = {
    "adult": "Model trained on adult patients, not children",
    "synthetic": "Model trained on synthetic phantoms, not patients",
    "unspecified": "The model bundle does not say who its model was trained on",
}
NOT_VALIDATED = "Volumes and labels have not been validated for children."


def population_warning(population: Population, age_years: float | None) -> PopulationWarning | None:
    """The warning for a patient of `age_years` (None: unknown) and a bundle trained on `population`; None when
    the patient is an adult (18 or older), the age is unknown, or the bundle was trained on children."""
    if population in CHILDREN_COVERED or age_years is None or not 0 <= age_years < ADULT_AGE_YEARS:
        return None
    stated_age, age_text = _stated_age(age_years)
    trained_on = TRAINED_ON.get(population, f"Model trained on a population declared as '{population}'")
    return PopulationWarning(patient_age_years=stated_age, bundle_population=population,
                             message=f"{trained_on}; this patient is {age_text}. {NOT_VALIDATED}")


def _stated_age(age_years: float) -> tuple[float, str]:
    """The age as a paediatric report states it, in whole years from 2 years on and whole months below (no finer:
    with the study date, a finer age would give the birth date away); and that age in years."""
    if age_years >= 2:
        years = math.floor(age_years + 1e-9)
        return float(years), f"{years} years old"
    months = math.floor(age_years * 12 + 1e-9)
    if months == 0:
        return 0.0, "less than a month old"
    return round(months / 12, 2), f"{months} month{'s' if months > 1 else ''} old"
