"""Identifier systems, code systems and names we read and write (see shared reference/codes.md)."""

from __future__ import annotations

NHS_NUMBER_SYSTEM = "https://fhir.nhs.uk/Id/nhs-number"
NHS_NUMBER_VERIFICATION_EXT = (
    "https://fhir.hl7.org.uk/StructureDefinition/Extension-UKCore-NHSNumberVerificationStatus"
)
NHS_NUMBER_VERIFICATION_SYSTEM = (
    "https://fhir.hl7.org.uk/CodeSystem/UKCore-NHSNumberVerificationStatusEngland"
)
ODS_ORGANISATION_SYSTEM = "https://fhir.nhs.uk/Id/ods-organization-code"
# DfE establishment URN (Get Information About Schools). No published FHIR system exists; ours is documented.
SCHOOL_URN_SYSTEM = "https://fhir.schoolslink.org.uk/Id/school-urn"
# Where a trust records the pupil's school on its Patient (as MHSDS MHS001 OrgIDEduEstab does).
EDUCATIONAL_ESTABLISHMENT_EXT = (
    "https://fhir.schoolslink.org.uk/StructureDefinition/Extension-EducationalEstablishment"
)
# Our own codes for the school context we send (no national code system covers them).
SCHOOL_CONTEXT_SYSTEM = "https://fhir.schoolslink.org.uk/CodeSystem/school-context"
LEARNER_KEY_SYSTEM = "https://fhir.schoolslink.org.uk/Id/learner-key"
MHSDS_TEAM_TYPE_SYSTEM = "https://fhir.schoolslink.org.uk/CodeSystem/mhsds-team-type"
MHSDS_REJECTION_REASON_SYSTEM = "https://fhir.schoolslink.org.uk/CodeSystem/mhsds-referral-rejection-reason"
MHSDS_CLOSURE_REASON_SYSTEM = "https://fhir.schoolslink.org.uk/CodeSystem/mhsds-referral-closure-reason"

# meta.source and tag on everything we write, so the incremental pull skips our own echoes.
OUR_META_SOURCE = "https://schoolslink.org.uk/pipeline"
OUR_TAG_SYSTEM = "https://fhir.schoolslink.org.uk/CodeSystem/origin"
OUR_TAG_CODE = "schoolslink"

PURPOSE_SUPPORT = "cypmhs-school-support"

# Extensions a trust uses for the MHSDS facts UK Core has no element for (documented in docs/formats.md).
_SD = "https://fhir.schoolslink.org.uk/StructureDefinition/"
TEAM_TYPE_EXT = _SD + "Extension-MHSDS-ServiceTeamTypeReferredTo"
REJECTION_REASON_EXT = _SD + "Extension-MHSDS-ReferralRejectionReason"
CLOSURE_REASON_EXT = _SD + "Extension-MHSDS-ReferralClosureReason"
TRANSITION_EXT = _SD + "Extension-TransitionToAdultServices"
CONFIDENTIALITY_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
PURPOSE_SYSTEM = "https://fhir.schoolslink.org.uk/CodeSystem/purpose"
# MHSDS closure reason 03: moved out of the area.
CLOSURE_MOVED_AREA = "03"
