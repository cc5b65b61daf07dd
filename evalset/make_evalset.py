"""Writes the "as people ask" evaluation set and checks questions.yaml against it.

Run from the repository root:  python evalset/make_evalset.py   (add --parse to also run every file,
and every e-mail attachment, through the appliance's own partitioner, ingest.partition).

Sixteen new documents for the two fictional organisations of the sample corpus, St. Brigid's General
Hospital (hospital/) and Harrow & Vale LLP (lawfirm/), on subjects the sample corpus does not cover.
Every person, number and date is invented and all text was written for this set. The writers are the
sample corpus's own (sample_corpus/make_corpus.py), pointed at this folder, so the output is
deterministic in the same way: fixed dates, fixed MIME boundaries, fixed ZIP timestamps.

The check at the end fails loudly unless, for every question in questions.yaml:
  * answerable: the answer is verbatim in the named page/section of the named document and in no
    other document of the set, is not given away by the question or its history, and the question
    does not copy five words in a row from its document;
  * on_topic (unanswerable): none of its `absent` terms occurs in any document of this set or of
    the sample corpus (so the set stays valid when both are loaded together);
  * the format, the ids, the tune/test balance per organisation and kind, and the coverage (every
    document and every format has answerable questions) are as the README says.
It also checks that no document here contains a term the sample corpus relies on being absent.
"""

from __future__ import annotations

import importlib
import io
import re
import sys
import tempfile
import textwrap
from collections import Counter
from contextlib import contextmanager
from email import policy
from email.parser import BytesParser
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
mc = importlib.import_module("sample_corpus.make_corpus")  # the sample corpus's writers and readers

SAMPLE_ROOT = mc.ROOT
ORGS = {"h": "hospital", "l": "lawfirm", "x": None}
KINDS = ("answerable", "on_topic", "off_topic")
CSV_TABLES = {
    "hospital/interpreter-services-directory.csv": "Interpreter services directory",
    "lawfirm/matter-type-codes.csv": "Matter type codes",
}
MIN_WORDS, MAX_WORDS = 300, 1500
COPY_NGRAM = 5  # a question may not share this many words in a row with its document
PDF_ATTACHMENT_SOURCE: dict[str, list[str]] = {}


@contextmanager
def rooted(root: Path):
    """Point the sample corpus's writers and readers (which use its module-level ROOT) at `root`."""
    saved = mc.ROOT
    mc.ROOT = root
    try:
        yield
    finally:
        mc.ROOT = saved


def wrap(text: str) -> str:
    """Plain-text paragraphs wrapped at 100 columns, as a person's text file would be."""
    return "\n\n".join(textwrap.fill(" ".join(p.split()), 100) for p in text.strip().split("\n\n"))


# ------------------------------------------------------------------------------------------------
# St. Brigid's General Hospital
# ------------------------------------------------------------------------------------------------
def hospital_transfusion() -> None:
    mc.write_docx(
        "hospital/blood-transfusion-policy.docx",
        "Blood Transfusion Policy",
        "Hospital Transfusion Team",
        [
            ("title", "Blood Transfusion Policy"),
            (
                "p",
                "Policy number BT-004, version 5. Approved by the Hospital Transfusion Committee on 14 January "
                "2025; next review due January 2027. Policy owner: Ewan Castellane, Lead Transfusion Practitioner.",
            ),
            ("h1", "1. Purpose and scope"),
            (
                "p",
                "This policy sets out how St. Brigid's General Hospital makes sure that every patient who needs "
                "blood receives the right component, at the right time, safely. It applies to all doctors, nurses, "
                "midwives, operating department practitioners, healthcare assistants and laboratory staff who "
                "request, collect, check, administer or monitor blood components in any ward or department. It "
                "covers red cells, platelets, fresh frozen plasma and cryoprecipitate. Plasma derivatives such as "
                "albumin and immunoglobulin are prescribed and supplied by pharmacy and fall outside this policy.",
            ),
            ("h1", "2. Consent and information for patients"),
            (
                "p",
                "Except in an emergency, the clinician who decides to transfuse discusses the reasons, risks and "
                "alternatives with the patient and records valid verbal consent in the medical notes. Give every "
                "patient the leaflet 'Receiving a Blood Transfusion' (leaflet code PIL-112) before the first unit "
                "is started. Patients who decline blood on religious or personal grounds are referred to the "
                "Transfusion Practitioner, who helps the team agree an individual care plan, and any advance "
                "decision to refuse treatment is filed at the front of the notes.",
            ),
            ("h1", "3. Blood samples"),
            ("h2", "3.1 Taking and labelling the sample"),
            (
                "p",
                "Positively identify the patient by asking them to state their full name and date of birth, and "
                "check these against the wristband. Label the sample tube by hand at the bedside, immediately "
                "after taking the blood and before leaving the patient. Pre-printed addressograph labels must "
                "never be used on transfusion sample tubes; the laboratory rejects any sample labelled in this "
                "way and a repeat sample will be needed.",
            ),
            ("h2", "3.2 The two-sample rule"),
            (
                "p",
                "Unless the laboratory already holds a confirmed blood group for the patient, two group and save "
                "samples are needed before non-urgent red cells can be issued. The second sample must be taken at "
                "a separate time, ideally by a different member of staff, so that a wrong-blood-in-tube error in "
                "the first sample will be detected.",
            ),
            ("h2", "3.3 How long a sample remains valid"),
            (
                "p",
                "A group and save sample is valid for 72 hours when the patient has been transfused or has been "
                "pregnant within the last three months, because new antibodies can form quickly. For all other "
                "patients the sample remains valid for 7 days from the time it was taken.",
            ),
            ("h1", "4. Collecting blood components"),
            (
                "p",
                "Red cells are stored in the Blood Bank fridge in Pathology, Level 0 of the Oak Wing, and in the "
                "satellite fridge on the Delivery Suite. Only staff whose collection competency is in date may "
                "collect components, and every collection is scanned out with the BloodTrack handheld. Take the "
                "patient's identification details (a collection slip or printout) to the fridge; never collect "
                "blood on a verbal request alone.",
            ),
            (
                "p",
                "A red cell unit must be started within 30 minutes of leaving the fridge. If it cannot be started "
                "in that time, do not put it back: return it to the Blood Bank for disposal and record why. "
                "Platelets are kept on an agitator in the Blood Bank at 22 degrees and must never be refrigerated "
                "or packed in a cool box.",
            ),
            ("h1", "5. Administration"),
            (
                "p",
                "Before each unit, the registered nurse, midwife or doctor giving it carries out the final bedside "
                "check with the patient: identity against the wristband, the component against the prescription, "
                "and the unit's expiry date, blood group and any special requirements such as irradiated "
                "components. The check is done by one person, at the bedside, from start to finish without "
                "interruption.",
            ),
            (
                "bullets",
                [
                    "Each red cell unit must be completed within 4 hours of leaving the fridge.",
                    "Use a blood giving set with a 170 to 200 micron filter.",
                    "Change the giving set at least every 12 hours, and when moving from red cells to platelets.",
                    "Never add a medicine to a blood component or run one through the same line.",
                ],
            ),
            ("h1", "6. Observations"),
            (
                "table",
                [
                    ["When", "What to record"],
                    [
                        "Before the unit starts (no more than 60 minutes before)",
                        "Temperature, pulse, blood pressure, respiratory rate and oxygen saturation",
                    ],
                    ["15 minutes after the start of each unit", "Temperature, pulse, blood pressure, respiratory rate"],
                    [
                        "Within 60 minutes of the end of each unit",
                        "Temperature, pulse, blood pressure, respiratory rate",
                    ],
                    ["Whenever the patient feels unwell", "A full set of observations and a NEWS2 score"],
                ],
            ),
            ("h1", "7. Suspected transfusion reactions"),
            (
                "p",
                "If the patient develops a fever, rigors, a rash, breathlessness, back pain or a fall in blood "
                "pressure, stop the transfusion straight away but keep the cannula open with saline. Call the "
                "patient's doctor, and ring the Blood Bank on extension 3370 for advice on which samples to send. "
                "Do not throw the bag or the giving set away: seal them in a specimen bag and return them to the "
                "laboratory. Every reaction, however mild, is reported on Datix and to the Transfusion "
                "Practitioner.",
            ),
            ("h1", "8. Major haemorrhage"),
            (
                "p",
                "For life-threatening bleeding, dial 2222, say 'major haemorrhage' and give your exact location. "
                "The switchboard alerts the Blood Bank, the on-call haematologist and a dedicated blood runner. "
                "Two units of O negative red cells are kept in the Emergency Department fridge for use before a "
                "group-specific sample is available. The first major haemorrhage pack holds 4 units of red cells "
                "and 4 units of fresh frozen plasma and is ready for collection within 10 minutes of the call.",
            ),
            ("h1", "9. Training"),
            (
                "p",
                "All staff who give blood complete the transfusion e-learning module every 2 years. Staff who "
                "collect components from the fridge must also pass a practical collection assessment, repeated "
                "every 3 years. Ward managers check compliance each month and may stop a member of staff from "
                "transfusion duties until their training is up to date.",
            ),
            ("h1", "10. Contacts"),
            (
                "table",
                [
                    ["Who", "Contact"],
                    ["Blood Bank (24 hours)", "Extension 3370"],
                    ["Lead Transfusion Practitioner, Ewan Castellane", "Extension 3374, bleep 1188"],
                    ["On-call haematologist", "Through the switchboard"],
                ],
            ),
        ],
    )


def hospital_transport() -> None:
    mc.write_pdf(
        "hospital/patient-transport-service.pdf",
        "Non-Emergency Patient Transport Service",
        "Head of Patient Flow",
        "St. Brigid's General Hospital - OP-031 Patient Transport",
        [
            [
                ("h1", "Non-Emergency Patient Transport Service"),
                (
                    "meta",
                    "St. Brigid's General Hospital - Operational Procedure OP-031 - Version 2 - Effective 1 "
                    "February 2025 - Owner: Head of Patient Flow, Rosalind Achterberg",
                ),
                ("h2", "1. Purpose"),
                (
                    "p",
                    "The non-emergency patient transport service takes patients to and from outpatient "
                    "appointments, day treatment and discharge when their medical condition means they cannot "
                    "safely travel any other way. It is run for the hospital by Kestrel Patient Transport under "
                    "contract, from the transport office beside the Main Entrance. This procedure explains who is "
                    "eligible, how to book, and what patients can expect on the day.",
                ),
                ("h2", "2. Who is eligible"),
                (
                    "p",
                    "Eligibility depends on the patient's medical or mobility needs, not on whether they own a car "
                    "or can afford a taxi. A patient is eligible when at least one of the following applies:",
                ),
                (
                    "bullets",
                    [
                        "they need a stretcher, or must stay in their wheelchair for the journey;",
                        "they need oxygen or other medical support during the journey;",
                        "they cannot walk unaided and have no one who can help them travel;",
                        "their condition would be made worse by travelling on public transport or by car, for "
                        "example after some day-case procedures.",
                    ],
                ),
                (
                    "p",
                    "Staff must not book transport for convenience or because relatives are unavailable. Kestrel's "
                    "call handlers ask the same eligibility questions for every request and may decline a booking "
                    "that does not meet the criteria. If you disagree with a decision, ask the Patient Flow "
                    "Coordinator to review it.",
                ),
                ("h2", "3. Escorts"),
                (
                    "p",
                    "One escort may travel with the patient when the patient has a learning disability, dementia "
                    "or another condition that means they need a carer with them, or when the patient is a child "
                    "under 16. Escorts must be able to manage their own mobility. Other relatives make their own "
                    "way to the hospital.",
                ),
            ],
            [
                ("h2", "4. Booking transport"),
                (
                    "p",
                    "Outpatient and day-case journeys are booked through the Transport Booking Hub on extension "
                    "5120, or on the TransportNet page of the intranet. The Hub takes calls from 08:00 to 18:00, "
                    "Monday to Friday. Book at least 48 hours before the appointment; bookings made with less "
                    "notice are accepted only when there is capacity and cannot be guaranteed.",
                ),
                (
                    "p",
                    "On Saturdays and Sundays the Hub is closed. Urgent transport at those times, including for "
                    "discharges, is arranged through the Site Manager on bleep 1406, who holds a small number of "
                    "reserved Kestrel crews each day.",
                ),
                ("h2", "5. Transport for discharges"),
                (
                    "p",
                    "Transport for a discharge on the same day must be requested by 12:00 noon. Later requests go "
                    "on a waiting list and may not be possible until the next day. When booking, give the ward, the "
                    "patient's mobility (walking, wheelchair or stretcher), whether they need oxygen, and the key "
                    "safe code if they live alone. Make sure the patient is dressed, has their medicines and "
                    "discharge letter, and is waiting in the Discharge Lounge or on the ward by the booked time.",
                ),
                ("h2", "6. Special requirements"),
                (
                    "bullets",
                    [
                        "Bariatric transport needs at least 5 working days' notice, so that the right vehicle and "
                        "crew can be arranged.",
                        "Patients on home oxygen bring their own portable cylinder for the journey; Kestrel crews "
                        "carry emergency oxygen only.",
                        "Patients with an infection that needs isolation travel alone, and the crew must be told "
                        "when the journey is booked.",
                        "Wheelchair users travel in their own chair only if it has crash-tested anchor points.",
                    ],
                ),
                ("h2", "7. Cancelling a booking"),
                (
                    "p",
                    "Cancel at least 24 hours in advance by ringing the Hub or updating TransportNet. Late "
                    "cancellations and aborted journeys cost the hospital the full fare, so check with the patient "
                    "the day before that they still need the journey.",
                ),
            ],
            [
                ("h2", "8. On the day of the journey"),
                (
                    "p",
                    "Patients should be ready from two hours before their appointment time, because pick-ups are "
                    "planned in rounds and the crew may arrive at any point in that window. After the appointment, "
                    "the clinic tells the transport office that the patient is ready to go home. Patients can "
                    "expect to be collected within 90 minutes of being booked as ready. If the wait is longer, the "
                    "clinic nurse rings the transport office to check.",
                ),
                ("h2", "9. Patients who travel by themselves"),
                (
                    "p",
                    "Patients who are not eligible for transport may be able to claim back their travel costs "
                    "under the national Healthcare Travel Costs Scheme if they receive certain benefits or hold a "
                    "low income certificate. Claims are paid in cash at the Cashier's Office, Level 0, next to the "
                    "Main Entrance, between 10:00 and 15:00. Patients need their appointment letter, their tickets "
                    "or a note of their mileage, and proof of entitlement. Car journeys are paid at 25p per mile, "
                    "and a taxi fare is refunded only if a doctor agreed in advance that a taxi was necessary.",
                ),
                ("h2", "10. Problems and feedback"),
                (
                    "p",
                    "Report late, missed or unsafe journeys on Datix and tell the Patient Flow Coordinator, Gethin "
                    "Moorcroft, on extension 5126. Patients and relatives who wish to comment on Kestrel Patient "
                    "Transport can use the feedback card carried on every vehicle or contact the Patient Advice "
                    "and Liaison Service.",
                ),
                ("h2", "11. Related documents"),
                (
                    "p",
                    "Discharge Policy; Bariatric Care Guideline; Oxygen Prescribing Policy; Isolation and "
                    "Infection Prevention procedures.",
                ),
            ],
        ],
    )


def hospital_pressure_ulcers() -> None:
    mc.write_pptx(
        "hospital/pressure-ulcer-prevention.pptx",
        "Pressure Ulcer Prevention",
        "Tissue Viability Service - essential update for ward staff, 2025",
        "Tissue Viability Service",
        [
            (
                "Why this matters",
                [
                    "In 2024 we recorded 41 hospital-acquired pressure ulcers of category 2 or above",
                    "Heels and the sacrum accounted for 7 out of 10 of them",
                    "Most developed in patients left in bed or in a chair for long periods without a change of "
                    "position",
                    "Almost all of them are avoidable with early assessment and simple, consistent care",
                ],
            ),
            (
                "Assess early",
                [
                    "Complete the Purpose-T risk assessment within 6 hours of admission",
                    "Inspect the skin over every bony prominence at the same time",
                    "Reassess at least weekly, and whenever the patient's condition changes",
                    "Patients who stay in the Emergency Department for longer than four hours are assessed there",
                ],
            ),
            (
                "The SSKIN bundle",
                [
                    "Surface: the right mattress and cushion for the patient's level of risk",
                    "Skin inspection: check and record at every repositioning",
                    "Keep moving: help the patient change position and get up where possible",
                    "Incontinence and moisture: clean promptly and use a barrier cream",
                    "Nutrition and hydration: complete the MUST score and refer to a dietitian if needed",
                ],
            ),
            (
                "Repositioning",
                [
                    "High-risk patients: change position at least every 2 hours, day and night",
                    "At-risk patients: change position at least every 4 hours",
                    "Use a 30-degree tilt to keep weight off the sacrum and hips",
                    "Record every change of position on the SSKIN chart at the bedside",
                    "High-risk patients sit out in a chair for no more than two hours at a time",
                ],
            ),
            (
                "Equipment",
                [
                    "Order dynamic (air) mattresses from the Equipment Library on extension 4862",
                    "The Library delivers mattresses within 4 hours of an order, 24 hours a day",
                    "Heel offloading boots are stocked on every ward: reorder code HB-220",
                    "Return equipment to the Library as soon as the patient no longer needs it",
                ],
            ),
            (
                "Reporting and referral",
                [
                    "Report every category 2 or above pressure ulcer on Datix within 24 hours",
                    "Refer category 3, category 4 and unstageable ulcers to Tissue Viability the same day",
                    "Photograph wounds only with the patient's consent, using the SkinSnap app on a ward device",
                    "Never use a personal phone to photograph a patient's skin",
                ],
            ),
            (
                "The Tissue Viability team",
                [
                    "Lead Tissue Viability Nurse: Marguerite Olufemi, bleep 2277",
                    "Team office: extension 4850, Monday to Friday 08:30 to 16:30",
                    "Wound clinic for outpatients: Tuesdays and Thursdays in Outpatients, Elm Wing",
                    "Out of hours, follow the SSKIN bundle and refer on the next working day",
                ],
            ),
            (
                "Completing this update",
                [
                    "Complete the 12-question quiz on the learning portal; the pass mark is 75%",
                    "All registered nurses and healthcare assistants must finish it by 31 May 2025",
                    "Ward managers see completion figures in the monthly quality report",
                ],
            ),
        ],
    )


def hospital_chaplaincy() -> None:
    team = [
        ["Name", "Role", "Faith or belief", "Extension", "Usually available", "Notes"],
        [
            "Revd Annika Thorsby",
            "Lead Chaplain",
            "Church of England",
            "4015",
            "Monday to Friday, 08:30 to 16:30",
            "Leads the Spiritual Care team and the volunteer visitor programme; first contact for comments "
            "about the service.",
        ],
        [
            "Father Declan Morrow",
            "Roman Catholic Chaplain",
            "Roman Catholic",
            "4016",
            "Monday, Wednesday and Friday",
            "Brings Holy Communion to wards and gives the Sacrament of the Sick; on other days a parish priest "
            "is called through the on-call list.",
        ],
        [
            "Imam Yusuf Harlow",
            "Muslim Chaplain",
            "Islam",
            "4017",
            "Tuesday to Friday, 10:00 to 18:00",
            "Leads Friday prayers and advises wards on care after death for Muslim patients, including urgent "
            "release of the body.",
        ],
        [
            "Giani Harjit Sandhu",
            "Sikh Chaplain (sessional)",
            "Sikhism",
            "4018",
            "Thursdays, or on request",
            "Visits on request through the Spiritual Care office.",
        ],
        [
            "Mrs Radhika Varadkar",
            "Hindu Chaplain (sessional)",
            "Hinduism",
            "4018",
            "Tuesdays, or on request",
            "Can arrange for a priest from the local temple to visit.",
        ],
        [
            "Rabbi Miriam Adler",
            "Jewish Visiting Minister",
            "Judaism",
            "Through the Spiritual Care office",
            "On request",
            "On the Sabbath and festivals the office contacts the synagogue's emergency number.",
        ],
        [
            "Ms Fenella Quist",
            "Non-religious Pastoral Carer",
            "Humanist and non-religious",
            "4019",
            "Wednesdays and Thursdays",
            "Supports patients, families and staff who are not religious or who prefer non-religious care.",
        ],
    ]
    services = [
        ["Service", "Day and time", "Place", "Notes"],
        [
            "Holy Communion (Church of England)",
            "Sunday 10:30",
            "Chapel, Level 1, Elm Wing",
            "Patients who cannot come to the Chapel can receive Communion on the ward; ask by Saturday 16:00.",
        ],
        ["Catholic Mass", "Wednesday 12:30", "Chapel, Level 1, Elm Wing", "Open to patients, visitors and staff."],
        [
            "Friday prayers (Jumu'ah)",
            "Friday 13:15",
            "Multi-faith Room, Level 2, Elm Wing",
            "Ablution facilities next door; prayer mats and copies of the Qur'an are kept in the room.",
        ],
        [
            "Quiet reflection",
            "Daily 07:00 to 21:00",
            "Chapel and Multi-faith Room",
            "Both rooms are open to anyone who needs a quiet space; please respect people at prayer.",
        ],
        [
            "Staff mindfulness session",
            "Thursday 12:15 to 12:45",
            "Multi-faith Room, Level 2, Elm Wing",
            "Led by Ms Quist; no booking needed.",
        ],
        [
            "Memorial service for bereaved families",
            "Second Sunday in November, 15:00",
            "Chapel, Level 1, Elm Wing",
            "Invitations are sent by the Bereavement Office.",
        ],
    ]
    out_of_hours = [
        ["Situation", "What to do", "What to expect"],
        [
            "A patient or family asks for a chaplain urgently between 17:00 and 08:30, or at the weekend",
            "Dial 0 and ask the switchboard for the on-call chaplain",
            "The on-call chaplain aims to be with the patient within an hour",
        ],
        [
            "A dying patient wants a minister of a particular faith",
            "Tell the switchboard which faith; they hold the contact list for each community",
            "Depends on the community; tell the family how long it may take",
        ],
        [
            "A Muslim or Jewish patient has died and the family asks for urgent release",
            "Ring the Bereavement Office during the day; out of hours, tell the Site Manager",
            "The Medical Examiner is asked to review the death the same day where possible",
        ],
        [
            "A member of staff needs support after a difficult shift",
            "Ring the Spiritual Care office on extension 4015 or any chaplain directly",
            "Confidential; no referral needed",
        ],
    ]
    mc.write_xlsx(
        "hospital/chaplaincy-spiritual-care.xlsx",
        "Chaplaincy and Spiritual Care",
        "Spiritual Care Team",
        [
            ("Team", team, [24, 28, 26, 18, 30, 70]),
            ("Services", services, [36, 30, 34, 70]),
            ("Out of hours", out_of_hours, [60, 60, 60]),
        ],
    )


def hospital_interpreters() -> None:
    header = ["Language", "Type", "Provider", "How to book", "Notice needed", "Notes"]
    rows = [
        [
            "All languages",
            "Policy",
            "-",
            "-",
            "-",
            "Family members, friends and children must not interpret for consent, diagnosis or discharge "
            "conversations. Record the interpreter's ID number in the notes.",
        ],
        [
            "Any language",
            "Telephone",
            "VoiceBridge",
            "Dial 0800 046 3310 from any hospital phone and give access code 55718",
            "None - available 24 hours",
            "Use the speakerphone or the dual-handset phones kept on each ward. Have the patient's hospital "
            "number ready.",
        ],
        [
            "Any language",
            "Video",
            "VoiceBridge",
            "Open the VoiceBridge app on the ward iPad and sign in with the ward login",
            "None - 07:00 to 23:00",
            "Video suits mental health assessments and patients who are hard of hearing better than telephone.",
        ],
        [
            "Polish",
            "Face to face",
            "In-house interpreter (Agata Wrobel)",
            "Ring extension 4590",
            "24 hours",
            "Works Monday to Thursday; at other times use VoiceBridge.",
        ],
        [
            "British Sign Language",
            "Face to face or video",
            "SignLink",
            "Email interpreting@stbrigids.example or ring extension 4591",
            "Three working days for planned appointments",
            "In an emergency SignLink provides a video BSL interpreter through the ward iPad.",
        ],
    ]
    agency = "Lingua Partners"
    for language, notice, note in [
        ("Romanian", "48 hours", "High demand on Mondays; book early for clinic lists."),
        ("Urdu", "48 hours", "Ask for a female interpreter for gynaecology and maternity appointments if wished."),
        ("Punjabi", "48 hours", "Say whether the patient speaks the Gurmukhi or the Shahmukhi tradition."),
        ("Bengali and Sylheti", "48 hours", "Many older patients speak Sylheti only; state the dialect."),
        ("Arabic", "48 hours", "State the country of origin so that a suitable dialect can be matched."),
        ("Portuguese", "48 hours", "Brazilian and European Portuguese interpreters are both available."),
        ("Somali", "72 hours", "Limited availability; telephone interpreting is usually quicker."),
        ("Tigrinya", "72 hours", "Limited availability; telephone interpreting is usually quicker."),
        ("Mandarin", "48 hours", ""),
        ("Cantonese", "48 hours", ""),
        ("Lithuanian", "48 hours", ""),
        ("Farsi", "48 hours", "Dari speakers can often be supported by a Farsi interpreter; check first."),
        ("Kurdish Sorani", "72 hours", "Do not book a Kurmanji interpreter by mistake."),
        ("Ukrainian", "48 hours", "Most interpreters also speak Russian."),
        ("Turkish", "48 hours", ""),
    ]:
        rows.append(
            [language, "Face to face", agency, "Book through the Interpreting Office on extension 4591", notice, note]
        )
    mc.write_csv("hospital/interpreter-services-directory.csv", [header, *rows])


def hospital_falls() -> None:
    mc.write_md(
        "hospital/falls-prevention-guideline.md",
        [
            ("h1", "Inpatient Falls Prevention Guideline"),
            (
                "p",
                "St. Brigid's General Hospital. Clinical guideline CG-058, version 3, approved by the Patient Safety "
                "Group in December 2024. Applies to all adult inpatient wards.",
            ),
            ("h2", "1. Why falls matter"),
            (
                "p",
                "Falls are the patient safety incident reported most often in the hospital: 612 inpatient falls "
                "were reported in 2024, and 19 of them caused moderate or severe harm, including 7 hip fractures. "
                "A fall can turn a short admission into a long one, and many patients lose confidence even when "
                "they are not hurt.",
            ),
            ("h2", "2. Multifactorial falls risk assessment"),
            (
                "p",
                "Every patient aged 65 or over, and every patient aged 50 to 64 whom the admitting clinician judges "
                "to be at higher risk because of an underlying condition, has a multifactorial falls risk "
                "assessment within 24 hours of admission. A falls risk score on its own is not enough. The "
                "assessment covers:",
            ),
            (
                "bullets",
                [
                    "previous falls and fear of falling;",
                    "medicines that raise the risk, such as sedatives, antihypertensives and diuretics;",
                    "lying and standing blood pressure (section 3);",
                    "continence and how often the patient needs the toilet;",
                    "delirium and cognition, using the 4AT;",
                    "eyesight, including whether the patient can see the call bell and has their glasses;",
                    "footwear, and walking aids kept within reach.",
                ],
            ),
            ("h2", "3. Lying and standing blood pressure"),
            (
                "p",
                "Ask the patient to lie flat for 5 minutes, then record the blood pressure. Ask them to stand and "
                "record it again after 1 minute and after 3 minutes, staying with them in case they feel dizzy. A "
                "drop in systolic pressure of 20 mmHg or more, or to below 90 mmHg, is significant: tell the "
                "medical team so that the patient's medicines can be reviewed.",
            ),
            ("h2", "4. Reducing the risk on the ward"),
            (
                "bullets",
                [
                    "Keep the call bell, drink and walking aid within reach, and check this at every intentional "
                    "rounding visit.",
                    "Patients without safe footwear are given non-slip slipper socks from ward stock.",
                    "Leave the bed at its lowest height whenever a member of staff is not at the bedside.",
                    "Patients at high risk are cared for in a bay with a member of staff present at all times.",
                    "Ultra-low beds and floor sensor mats are requested from the Falls Team.",
                    "Bed rails are used only after a bed rails assessment, and never for a confused patient who "
                    "might climb over them.",
                ],
            ),
            ("h2", "5. After a fall"),
            (
                "p",
                "Do not help the patient up until a registered nurse has checked them for injury. If a hip, spine "
                "or neck injury is possible, use flat-lifting equipment: a HoverJack is kept in the equipment bay "
                "on every floor. A doctor reviews every patient who falls. Patients taking an anticoagulant who "
                "have hit their head, or whose fall was not witnessed, have a CT head scan within 8 hours of the "
                "fall. Start neurological observations every 30 minutes for the first 2 hours after any head "
                "injury, and tell the family the same day.",
            ),
            ("h2", "6. Reporting and learning"),
            (
                "p",
                "Report every fall on Datix before the end of the shift, including falls without injury. Falls "
                "causing moderate harm or worse are investigated and presented at the Falls Steering Group, which "
                "meets on the third Thursday of every month. Ward falls figures are displayed on the ward safety "
                "board.",
            ),
            ("h2", "7. Contacts"),
            (
                "bullets",
                [
                    "Falls Lead Physiotherapist: Owain Brackley, extension 4733",
                    "Falls Prevention Nurse: Celestine Abara, bleep 1543",
                    "Falls Team (ultra-low beds and sensor mats): extension 4734",
                ],
            ),
        ],
    )


def hospital_bereavement() -> None:
    mc.write_html(
        "hospital/bereavement-office.html",
        "Bereavement Office - St. Brigid's General Hospital",
        [
            ("h1", "Bereavement Office"),
            (
                "p",
                "We are very sorry for your loss. The Bereavement Office supports families and carers after a "
                "patient has died at St. Brigid's General Hospital. We look after the paperwork, arrange for you to "
                "see your relative if you wish, return their belongings and work with your chosen funeral "
                "director. This page explains what happens next.",
            ),
            ("h2", "Where to find us"),
            (
                "p",
                "The office is on the ground floor of the Ash Wing, next to the Chapel of Rest. Follow the signs "
                "from the Main Entrance; the walk takes about five minutes and there is a lift for anyone who "
                "cannot manage the ramp.",
            ),
            ("h2", "When we are open"),
            (
                "p",
                "Monday to Friday, 09:00 to 16:00. Closed at weekends and on bank holidays. Telephone 01632 960418. "
                "Please ring before coming in, so that we can make sure everything is ready for you.",
            ),
            ("h2", "The medical certificate"),
            (
                "p",
                "A doctor who looked after your relative completes the Medical Certificate of Cause of Death, and "
                "the hospital's Medical Examiner service reviews it. We aim to have the certificate ready within 3 "
                "working days of the death. A Medical Examiner officer may phone the next of kin to explain the "
                "cause of death and ask whether you have any concerns about the care. When the certificate is "
                "ready we send it electronically to the register office and ring you to let you know.",
            ),
            ("h2", "Registering the death"),
            (
                "p",
                "Deaths in England must be registered within 5 days. Book an appointment with Northmere Register "
                "Office on 01632 960555 once we have told you that the certificate has been sent. Take your "
                "relative's birth certificate and NHS number if you have them. The registrar gives you the green "
                "form that the funeral director needs.",
            ),
            ("h2", "Seeing your relative"),
            (
                "p",
                "You can spend time with your relative in the Chapel of Rest by appointment, from 10:00 to 15:00, "
                "Monday to Friday. Please give us at least 24 hours' notice so that we can prepare. A member of "
                "staff will stay nearby. Visits at other times can sometimes be arranged for religious reasons; "
                "ask the ward or the Site Manager.",
            ),
            ("h2", "Personal belongings"),
            (
                "p",
                "Your relative's belongings are listed by the ward, sealed in a property bag and brought to the "
                "Bereavement Office, where the next of kin collects them and signs for them. Jewellery that your "
                "relative was wearing stays with them unless you ask us to remove it. Belongings that have not "
                "been collected after 3 months are disposed of, after we have written to you.",
            ),
            ("h2", "Funeral arrangements"),
            (
                "p",
                "Contact the funeral director of your choice; they will contact us to arrange to bring your "
                "relative into their care. The next of kin signs a release form at the office first. If your faith "
                "requires a burial within a short time, tell the ward and the office as early as possible and we "
                "will ask the Medical Examiner to review the death the same day. Out of hours, the Site Manager can "
                "start this process.",
            ),
            ("h2", "Support for you"),
            (
                "p",
                "Our Bereavement Support Nurse, Hollis Penrose, can talk with you now or in the weeks ahead; ring "
                "01632 960419. The leaflet 'When someone has died' lists local bereavement charities and support "
                "groups, and the hospital chaplains are available to people of every faith and none.",
            ),
        ],
    )


def hospital_travel_email() -> None:
    attachment = mc.docx_bytes(
        "Staff Travel Scheme 2025",
        "Estates and Facilities",
        [
            ("title", "Staff Travel Scheme 2025"),
            (
                "p",
                "Estates and Facilities, St. Brigid's General Hospital. Effective 7 April 2025. This scheme replaces "
                "the 2021 Green Travel Plan.",
            ),
            ("h1", "1. Aims"),
            (
                "p",
                "Fewer cars on the hospital site, fewer staff arriving late because of traffic on the Northgate "
                "road, and more staff choosing to walk, cycle or share a lift. Every member of staff, including "
                "bank and agency workers with a hospital ID badge, may use the scheme.",
            ),
            ("h1", "2. Shuttle bus"),
            (
                "p",
                "The staff shuttle stops at Northgate railway station (Stand D), Riverside bus interchange and the "
                "hospital's Main Entrance. The first bus leaves Northgate at 06:15 and the last leaves the Main "
                "Entrance at 20:45. Staff on night shifts who finish after the last bus may use the late-finish "
                "taxi arrangement in section 6.",
            ),
            ("h1", "3. Car sharing"),
            (
                "p",
                "Register on the ShareWheels portal to find colleagues who live near you. A registered group of two "
                "or more staff who share on at least 3 days a week receives a permit for the priority bays in Car "
                "Park C, which are kept free for sharers until 10:00. If your driver is unexpectedly unable to take "
                "you home, you may claim a guaranteed ride home by taxi, up to 4 times a year.",
            ),
            ("h1", "4. Cycling"),
            (
                "p",
                "The secure cycle store is behind the Pathology block and opens with your ID badge. Showers, "
                "changing rooms and lockers are in the Staff Hub, Level 1, Birch Wing. A mechanic runs a free "
                "bike check outside the Staff Hub on the first Tuesday of every month, from 11:00 to 14:00.",
            ),
            ("h1", "5. Cycle to work scheme"),
            (
                "p",
                "Staff can get a bike and safety equipment worth up to £2,500 through salary sacrifice, repaid "
                "from gross pay over 12 months, which saves tax and National Insurance. Apply through the staff "
                "benefits portal; the scheme is open all year. Staff on fixed-term contracts must have at least 12 "
                "months of their contract left.",
            ),
            ("h1", "6. Late-finish taxis"),
            (
                "p",
                "Staff who finish a shift between 23:00 and 06:00, when no shuttle is running, and who have no safe "
                "way home may ask the Site Manager to book a taxi on the hospital's account. This is for occasional "
                "use, such as a shift that overran, and each use is recorded.",
            ),
            ("h1", "7. Contact"),
            ("p", "Priya Anand, Travel and Transport Coordinator: extension 4127, travel@stbrigids.example."),
        ],
    )
    mc.write_eml(
        "hospital/email-staff-shuttle-and-car-share.eml",
        {
            "From": "Priya Anand <p.anand@stbrigids.example>",
            "To": "All staff <all-staff@stbrigids.example>",
            "Subject": "Staff shuttle bus and car share scheme from 7 April",
            "Date": "Tue, 18 Mar 2025 11:30:00 +0000",
            "Message-ID": "<20250318113000.anand@stbrigids.example>",
        },
        """
Dear colleagues,

From Monday 7 April 2025 a staff shuttle bus will run between Northgate railway station and the
hospital's Main Entrance, stopping at Riverside bus interchange on the way.

The shuttle runs every 20 minutes from 06:15 to 20:45, Monday to Saturday, and every 40 minutes on
Sundays. Just show your staff ID badge to the driver; there is no charge. Each bus has space for two
folded bikes and a wheelchair.

At the same time we are launching a car share scheme. If you register on the ShareWheels portal by
Friday 28 March, you will be in the first allocation of permits for the car share priority bays in
Car Park C. Registration stays open after that date, but permits will then be issued as bays become
free.

The full Staff Travel Scheme is attached. It also covers the secure cycle store, showers and lockers,
the cycle to work scheme, and what to do if you finish a late shift and have no way home.

If you have any questions, ring me on extension 4127 or email travel@stbrigids.example.

Best wishes,
Priya

Priya Anand
Travel and Transport Coordinator
Estates and Facilities
St. Brigid's General Hospital
""",
        attachment=(
            "staff-travel-scheme.docx",
            "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
            attachment,
        ),
        boundary="==evalset-boundary-hospital==",
    )


# ------------------------------------------------------------------------------------------------
# Harrow & Vale LLP
# ------------------------------------------------------------------------------------------------
def law_aml() -> None:
    mc.write_docx(
        "lawfirm/aml-procedure.docx",
        "Anti-Money Laundering Procedure",
        "Risk and Compliance",
        [
            ("title", "Anti-Money Laundering Procedure"),
            (
                "p",
                "Harrow & Vale LLP. Version 3.2, effective 1 February 2025. Owner: the Money Laundering Reporting "
                "Officer. Applies to all partners, fee earners, secretaries, trainees and finance staff.",
            ),
            ("h1", "1. Key people"),
            (
                "p",
                "The firm's Money Laundering Reporting Officer (MLRO) is Bartholomew Okafor, a partner in the Real "
                "Estate department, extension 2210. The Deputy MLRO, Harriet Lindqvist, extension 2214, acts for "
                "him whenever he is absent or unavailable. The Money Laundering Compliance Officer, who is "
                "responsible for the firm's policies and controls, is the Head of Risk, Tamsin Greaves.",
            ),
            ("h1", "2. When client due diligence is needed"),
            (
                "p",
                "Client due diligence (CDD) must be completed before any work starts on a matter and before any "
                "money is received from the client or from a third party. It is needed for every new client, and "
                "for an existing client when the identification on file is more than 3 years old or when the "
                "client's ownership or circumstances have changed. No matter may move from 'pending' to 'open' in "
                "the matter system until the file-opening team has approved the CDD record.",
            ),
            ("h1", "3. Identifying clients"),
            ("h2", "3.1 Individuals"),
            (
                "p",
                "Obtain one current photographic identity document (a passport or full driving licence) and one "
                "document showing the client's home address dated within the last 3 months, such as a bank "
                "statement or council tax bill. Originals are seen in person or verified electronically through "
                "the firm's verification provider, VeriTrace; a photocopy emailed by the client is not enough on "
                "its own.",
            ),
            ("h2", "3.2 Companies and other organisations"),
            (
                "p",
                "Obtain a current Companies House extract (or the foreign equivalent) and identify every beneficial "
                "owner who holds more than 25% of the shares or voting rights, or who otherwise controls the "
                "organisation. Beneficial owners are identified as individuals under 3.1. Check that the register "
                "of people with significant control matches what the client tells you, and report any discrepancy "
                "to the MLRO.",
            ),
            ("h1", "4. Risk assessment and enhanced due diligence"),
            (
                "p",
                "Every matter has a risk rating of low, medium or high, recorded on the matter risk assessment "
                "form. Enhanced due diligence is required for politically exposed persons, clients connected with "
                "a high-risk third country, complex structures with no clear purpose, and any matter the fee earner "
                "rates as high risk. It includes establishing the source of funds and the source of wealth, and it "
                "must be approved by the supervising partner and the MLRO before work begins.",
            ),
            (
                "table",
                [
                    ["Risk rating", "CDD refreshed every", "Approved by"],
                    ["Low", "36 months", "Fee earner"],
                    ["Medium", "24 months", "Supervising partner"],
                    ["High", "12 months", "Supervising partner and MLRO"],
                ],
            ),
            ("h1", "5. Cash"),
            (
                "p",
                "The firm does not accept cash payments of more than £500 in total on any one matter, whoever "
                "offers them. Any attempt to pay more in cash, or to split cash payments to stay under the limit, "
                "must be reported to the MLRO.",
            ),
            ("h1", "6. Reporting a suspicion"),
            (
                "p",
                "If you know or suspect that a person is engaged in money laundering or terrorist financing, "
                "complete an internal suspicion report (form SAR-1 on the intranet) and send it to the MLRO on the "
                "same day. Do not discuss your suspicion with the client or anyone outside the firm: doing so may "
                "be the offence of tipping off. Do not go on with the transaction until the MLRO says you may. The "
                "MLRO decides within 2 working days whether to make a report to the National Crime Agency and "
                "tells you what to do next.",
            ),
            ("h1", "7. Training"),
            (
                "p",
                "All staff complete the anti-money laundering e-learning module by 31 March each year. New joiners "
                "complete it within their first 4 weeks. Fee earners in Real Estate and Private Client also attend "
                "a one-hour workshop on property and probate fraud every autumn.",
            ),
            ("h1", "8. Keeping records"),
            (
                "p",
                "CDD records, risk assessments and suspicion reports are kept for 5 years after the end of the "
                "business relationship, and then destroyed unless the MLRO asks for them to be kept longer. "
                "Suspicion reports are held by the MLRO in a restricted folder and are never placed on the client "
                "file.",
            ),
        ],
    )


def law_client_money() -> None:
    mc.write_pdf(
        "lawfirm/client-money-procedure.pdf",
        "Client Money Procedure",
        "Compliance Officer for Finance and Administration",
        "Harrow & Vale LLP - AP-02 Client Money Procedure",
        [
            [
                ("h1", "Client Money Procedure"),
                (
                    "meta",
                    "Harrow & Vale LLP - Accounts Procedure AP-02 - Version 4 - Effective 1 January 2025 - Owner: "
                    "Compliance Officer for Finance and Administration",
                ),
                ("h2", "1. Why this matters"),
                (
                    "p",
                    "Client money is money we hold for clients or third parties: money on account of costs, "
                    "purchase money, damages and settlement sums. Clients trust us to keep it safe, and the SRA "
                    "Accounts Rules require us to keep it separate from the firm's own money and to account for "
                    "it properly. Mistakes with client money are among the most serious regulatory breaches a "
                    "firm can make, and fee earners are personally responsible for the ledgers of their matters.",
                ),
                ("h2", "2. Key principles"),
                (
                    "bullets",
                    [
                        "Client money is kept in a client bank account, separate from the firm's own money.",
                        "Client money is never used to pay the firm's own costs or another client's costs.",
                        "Client money is paid in promptly: on the day it is received or, if that is not "
                        "possible, on the next working day.",
                        "Clients may not use the client account as a banking service: we hold money only in "
                        "connection with our legal work for them.",
                        "Money for our costs is transferred to office account only after a bill or written "
                        "notice of costs has been sent to the client.",
                    ],
                ),
                ("h2", "3. Who to ask"),
                (
                    "p",
                    "The Compliance Officer for Finance and Administration (COFA) is Ingrid Solberg-Wyatt, "
                    "extension 2240. Day-to-day questions go to the Cashiers team on extension 2245, between 09:00 "
                    "and 17:30.",
                ),
            ],
            [
                ("h2", "4. Money coming in"),
                (
                    "p",
                    "Cheques and banker's drafts go to the Cashiers by 15:00 so that they are banked the same day. "
                    "Electronic receipts appear on the daily bank report and must be allocated to the correct "
                    "client ledger by the end of the next working day. If you are expecting money, tell the "
                    "Cashiers the client, the matter number and the amount so that it can be matched. Money that "
                    "cannot be identified is held in a suspense ledger while the Cashiers ask all fee earners.",
                ),
                ("h2", "5. Money going out"),
                (
                    "p",
                    "Every payment from client account is requested through a payment requisition in Ledgerline, "
                    "with the supporting document attached (for example the completion statement or the client's "
                    "signed instructions). There must be enough cleared money on the client's ledger to cover the "
                    "payment; the Cashiers will not make a payment that would overdraw a client ledger.",
                ),
                (
                    "bullets",
                    [
                        "Payments up to £10,000 need one authoriser, who must be a partner or a senior associate "
                        "on the authorised signatory list.",
                        "Payments over £10,000 need two authorisers, at least one of whom is a partner.",
                        "Same-day CHAPS payments must be requisitioned and authorised by 14:30; later requests "
                        "are paid on the next working day.",
                        "BACS payments take 3 working days to arrive.",
                    ],
                ),
                ("h2", "6. Changed bank details and payment fraud"),
                (
                    "p",
                    "Criminals send emails that appear to come from clients, estate agents or other firms asking "
                    "us to send money to new bank details. Never act on bank details, or a change of bank details, "
                    "received by email alone. Before the first payment to any payee, and whenever details change, "
                    "make a verification call to the payee on a telephone number already held on the file, not a "
                    "number given in the email. Record the call on the payment requisition. If in doubt, stop and "
                    "speak to the Cashiers.",
                ),
            ],
            [
                ("h2", "7. Interest"),
                (
                    "p",
                    "We account to clients for interest on money held for them in line with our interest policy. "
                    "Interest is calculated at the rate paid on the general client account and is paid where the "
                    "amount calculated for a matter is £25 or more. It is paid when the matter closes or, for "
                    "money held for a long time, at the end of each financial year (30 April).",
                ),
                ("h2", "8. Reconciliations"),
                (
                    "p",
                    "The Cashiers reconcile client ledgers with the bank statements at least every 5 weeks; in "
                    "practice this is done monthly. The COFA signs each reconciliation and investigates any "
                    "difference. Fee earners answer Cashiers' queries about their ledgers within 3 working days.",
                ),
                ("h2", "9. Residual balances"),
                (
                    "p",
                    "At the end of a matter, return any money left on the client ledger promptly. If a client "
                    "cannot be traced after reasonable efforts, balances of £500 or less may be paid to charity "
                    "with the COFA's approval; larger balances need the SRA's permission.",
                ),
                ("h2", "10. Breaches"),
                (
                    "p",
                    "Report any breach of this procedure, however small, to the COFA on the day you discover it. "
                    "Breaches are put right at once, using office money where necessary to replace any shortfall "
                    "on client account. The COFA keeps a breach log and reports material breaches to the SRA.",
                ),
            ],
        ],
    )


def law_trainee_seats() -> None:
    mc.write_pptx(
        "lawfirm/trainee-seat-rotation.pptx",
        "Trainee Seat Rotation 2025-2027",
        "Harrow & Vale LLP - Graduate Recruitment guide for trainee solicitors",
        "Graduate Recruitment",
        [
            (
                "How the training contract works",
                [
                    "Your two-year training contract is made up of four seats of six months each",
                    "Intakes start on 1 March and 1 September each year",
                    "At least one seat must be contentious: Commercial Litigation or Family",
                    "You may repeat a seat in your fourth rotation if you hope to qualify into that team",
                ],
            ),
            (
                "Choosing your next seat",
                [
                    "Rank three preferred seats on the seat preference form",
                    "Send the form to Graduate Recruitment by 31 January for March moves",
                    "Send it by 31 July for September moves",
                    "Allocations are published four weeks before each rotation",
                    "Tell us about any personal circumstances we should take into account",
                ],
            ),
            (
                "Seats on offer",
                [
                    "Commercial Litigation",
                    "Real Estate",
                    "Corporate and Commercial",
                    "Private Client (wills, trusts and probate)",
                    "Banking and Finance",
                    "Family",
                    "Client secondment to Brackenridge Foods plc (one trainee each rotation)",
                ],
            ),
            (
                "Secondments",
                [
                    "The secondment lasts one full seat and counts as non-contentious experience",
                    "Apply with a short cover note to Graduate Recruitment when you send your preferences",
                    "You need a satisfactory review in your current seat to be considered",
                    "Secondees keep their firm laptop and attend the monthly trainee meeting",
                ],
            ),
            (
                "Supervision and reviews",
                [
                    "Each trainee sits with a supervisor: a partner or senior associate",
                    "Mid-seat review with your supervisor at the three-month point",
                    "End-of-seat review in the final two weeks of the seat",
                    "Reviews are recorded in your training record on the HR portal",
                ],
            ),
            (
                "Qualification",
                [
                    "Newly qualified (NQ) vacancies are published in April of your final year",
                    "Apply for NQ roles by 15 May",
                    "Offers are made by 30 June",
                    "You need your SQE results and the firm's sign-off of two years of qualifying work experience",
                ],
            ),
            (
                "Who to ask",
                [
                    "Training Principal: Lucinda Aymes-Foster, partner",
                    "Graduate Recruitment Manager: Oliver Quennell, extension 2301",
                    "Trainee representative on the Training Committee: elected each March",
                    "Confidential employee assistance line: 0800 112 4040, open 24 hours",
                ],
            ),
        ],
    )


def law_expenses() -> None:
    limits = [
        ["Category", "Limit", "Conditions"],
        [
            "Rail travel",
            "Standard class",
            "First class only for journeys longer than 3 hours, or when a client meeting on the train needs it.",
        ],
        ["Hotel - London", "£180 per night", "Bed and breakfast. Book through the travel desk where possible."],
        [
            "Hotel - elsewhere in the UK",
            "£120 per night",
            "Bed and breakfast. Book through the travel desk where possible.",
        ],
        ["Evening meal when staying overnight", "£35 per night", "Includes one drink with the meal."],
        ["Lunch on a full-day trip", "£15", "Only when you are away from the office for the whole working day."],
        [
            "Mileage in your own car",
            "45p per mile",
            "Business journeys only; commuting miles do not count. Record the start and end addresses.",
        ],
        [
            "Taxis",
            "Actual cost",
            "Only after 21:00, when carrying heavy files or equipment, or where there is no reasonable public "
            "transport.",
        ],
        [
            "Client entertainment",
            "£75 per head",
            "Needs the supervising partner's approval in advance; record the client, the matter and the guests.",
        ],
        ["Team celebrations", "£25 per head", "Team leaders may claim for one team celebration a year."],
    ]
    process = [
        ["Step", "What to do", "When"],
        [
            "1",
            "Enter the claim in Spendwise, the expenses app, and photograph every receipt",
            "Within 30 days of spending the money",
        ],
        [
            "2",
            "Allocate each item to a matter number if it can be recharged to a client, or to your department "
            "code if not",
            "When you enter the claim",
        ],
        [
            "3",
            "Submit the claim for approval",
            "Claims submitted and approved by the 20th of the month are paid with that month's pay",
        ],
        ["4", "Your approver checks the claim and approves or queries it", "Within 5 working days of submission"],
        ["5", "Finance checks the receipts and the matter allocations", "Before payment"],
        ["Late claims", "Spending more than 90 days old is not paid unless the Finance Director agrees", "-"],
    ]
    approvals = [
        ["Claim total", "Approver"],
        ["Up to £250", "Team leader"],
        ["£250.01 to £1,000", "Supervising partner"],
        ["Over £1,000", "Finance Director (Malachy Dunmore)"],
        ["Any claim by a partner", "Another partner in the same department"],
    ]
    excluded = [
        ["Item", "Notes"],
        ["Parking fines and speeding penalties", "These are the driver's own responsibility, even on firm business."],
        ["Upgrades to first class travel or better hotel rooms", "Unless the Limits sheet allows them."],
        ["Minibar, films and room service extras", "Settle these yourself when you check out."],
        ["Alcohol", "Except one drink with an evening meal, or when entertaining clients."],
        ["Personal items such as toiletries and clothing", "Including items replacing ones forgotten at home."],
        ["Gym, spa or leisure charges at hotels", "Not claimable in any circumstances."],
        ["Travel between home and your usual office", "Commuting is never claimable, including at weekends."],
    ]
    mc.write_xlsx(
        "lawfirm/expenses-policy.xlsx",
        "Expenses Policy and Rates 2025",
        "Finance",
        [
            ("Limits", limits, [36, 18, 90]),
            ("Claims process", process, [12, 80, 70]),
            ("Approvals", approvals, [26, 40]),
            ("Not reimbursed", excluded, [50, 70]),
        ],
    )


def law_matter_codes() -> None:
    header = ["Code", "Work type", "Department", "Supervising partner", "Risk rating", "Money on account", "Notes"]
    rows = [
        [
            "LIT-COM",
            "Commercial disputes",
            "Commercial Litigation",
            "Duncan Ferreira-Lowe",
            "Medium",
            "£5,000",
            "The conflict search must include every opponent and its parent company.",
        ],
        [
            "LIT-DEB",
            "Debt recovery",
            "Commercial Litigation",
            "Duncan Ferreira-Lowe",
            "Low",
            "£750",
            "Fixed-fee letters before action; bulk instructions need their own engagement letter.",
        ],
        [
            "LIT-PRN",
            "Professional negligence claims",
            "Commercial Litigation",
            "Anjali Whitcombe",
            "High",
            "£7,500",
            "Check whether the opponent is a firm we have instructed before accepting.",
        ],
        [
            "RE-COM",
            "Commercial property sales and purchases",
            "Real Estate",
            "Cormac Delahunty",
            "Medium",
            "£2,500",
            "Searches are ordered once the money on account has been received.",
        ],
        [
            "RE-RES",
            "Residential conveyancing",
            "Real Estate",
            "Philippa Nakamura",
            "High",
            "£300",
            "Evidence of the source of funds is needed before exchange in every case.",
        ],
        [
            "RE-LEA",
            "Commercial leases",
            "Real Estate",
            "Philippa Nakamura",
            "Low",
            "£1,000",
            "Lease renewals for existing landlord clients may reuse the existing CDD if it is in date.",
        ],
        [
            "CORP-MA",
            "Mergers and acquisitions",
            "Corporate and Commercial",
            "Theo Kasprzak",
            "High",
            "£15,000",
            "Data room access is set up by the file-opening team once the matter is open.",
        ],
        [
            "CORP-GEN",
            "General company matters",
            "Corporate and Commercial",
            "Theo Kasprzak",
            "Medium",
            "£2,250",
            "Covers share transfers, board minutes and Companies House filings.",
        ],
        [
            "COM-CON",
            "Commercial contracts",
            "Corporate and Commercial",
            "Sunniva Halloran",
            "Low",
            "£1,500",
            "Use the standard terms of business for framework agreements.",
        ],
        [
            "BNK-LEN",
            "Lending and security",
            "Banking and Finance",
            "Rupert Achebe",
            "Medium",
            "£3,000",
            "Lender clients are set up centrally; ask the file-opening team before opening.",
        ],
        [
            "PC-WIL",
            "Wills and lasting powers of attorney",
            "Private Client",
            "Eleanor Marchbanks",
            "Low",
            "£250",
            "Fixed fees; any doubt about capacity goes to the supervising partner.",
        ],
        [
            "PC-EST",
            "Probate and estate administration",
            "Private Client",
            "Eleanor Marchbanks",
            "Medium",
            "£1,000",
            "The executors are the clients; identify each of them.",
        ],
        [
            "PC-TRU",
            "Trusts",
            "Private Client",
            "Eleanor Marchbanks",
            "High",
            "£2,500",
            "Register the trust with the Trust Registration Service where required.",
        ],
        [
            "FAM-DIV",
            "Divorce and financial remedies",
            "Family",
            "Georgina Ostrowski",
            "Medium",
            "£2,000",
            "Check for domestic abuse indicators at the first meeting.",
        ],
        [
            "FAM-CHI",
            "Child arrangements",
            "Family",
            "Georgina Ostrowski",
            "Medium",
            "£1,750",
            "Safeguarding concerns go to the supervising partner the same day.",
        ],
        [
            "FAM-PNA",
            "Pre-nuptial and cohabitation agreements",
            "Family",
            "Georgina Ostrowski",
            "Low",
            "£1,250",
            "Both parties must have separate legal advice; we act for one party only.",
        ],
        [
            "GEN-ADV",
            "General advice where no other code fits",
            "Risk and Compliance",
            "Tamsin Greaves",
            "Medium",
            "£500",
            "For one-off advice only; ask the file-opening team before using this code.",
        ],
    ]
    mc.write_csv("lawfirm/matter-type-codes.csv", [header, *rows])


def law_data_breach() -> None:
    mc.write_md(
        "lawfirm/data-breach-procedure.md",
        [
            ("h1", "Personal Data Breach Procedure"),
            (
                "p",
                "Harrow & Vale LLP, Risk and Compliance. Version 2.1, January 2025. This procedure applies to "
                "everyone who works for the firm, including contractors, secondees and temporary staff.",
            ),
            ("h2", "1. What counts as a breach"),
            (
                "p",
                "A personal data breach is any security incident that leads to personal data being lost, "
                "destroyed, changed, disclosed or accessed without authority, whether by accident or on purpose. "
                "Common examples at a law firm:",
            ),
            (
                "bullets",
                [
                    "an email or letter containing a client's personal data sent to the wrong recipient;",
                    "a lost or stolen laptop, phone or paper file;",
                    "papers left on a train or in a court waiting area;",
                    "someone opening a file or folder they have no reason to see;",
                    "a ransomware attack or a compromised email account;",
                    "disclosing a document in a bundle or to the other side without redacting personal data.",
                ],
            ),
            ("h2", "2. Report it within one hour"),
            (
                "p",
                "Tell the Data Protection Officer within one hour of discovering a breach, or of suspecting one, "
                "even if you are not sure it counts. The DPO is Saoirse Fairbairn, extension 2288, "
                "dpo@harrow-vale.example. If the DPO cannot be reached, for example in the evening or at the "
                "weekend, report it to the IT Service Desk on extension 2999, which is staffed 24 hours a day and "
                "will escalate it. Never try to deal with a breach quietly yourself.",
            ),
            ("h2", "3. Contain it"),
            (
                "bullets",
                [
                    "Misdirected email: ask the recipient to delete it and to confirm in writing that they have "
                    "done so. Message recall rarely works outside the firm, so do not rely on it.",
                    "Lost or stolen device: the IT Service Desk can lock and wipe a firm laptop or phone, but only "
                    "if told quickly. Report a theft to the police and note the crime reference.",
                    "Lost papers: retrace your steps and contact the transport operator's lost property office.",
                    "Do not delete emails, logs or other evidence, and do not contact the person affected until "
                    "the DPO has agreed what to say.",
                ],
            ),
            ("h2", "4. Assessment"),
            (
                "p",
                "The DPO records the breach, gathers the facts from you and assesses the risk to the people whose "
                "data is involved, using the firm's breach risk matrix. The assessment considers the kind of data "
                "(special category data such as health records counts as higher risk), how many people are "
                "affected, whether the data was encrypted, and whether it has been recovered.",
            ),
            ("h2", "5. Telling the ICO"),
            (
                "p",
                "Where a breach is likely to result in a risk to people's rights and freedoms, the DPO reports it "
                "to the Information Commissioner's Office within 72 hours of the firm becoming aware of it. Only "
                "the DPO, or the Head of Risk when the DPO is away, may contact the ICO about a breach.",
            ),
            ("h2", "6. Telling clients and the people affected"),
            (
                "p",
                "Where the risk is high, the people affected are told without undue delay, in plain language, "
                "with advice on protecting themselves. The client relationship partner tells the client; every "
                "letter is approved by the DPO first. Serious breaches may also have to be reported to the SRA and "
                "to the firm's insurers.",
            ),
            ("h2", "7. Breach register"),
            (
                "p",
                "Every breach, including those not reported to the ICO, is recorded in the Breach Register with "
                "the facts, the assessment and the decision taken. Entries are kept for 6 years.",
            ),
            ("h2", "8. Learning lessons"),
            (
                "p",
                "The DPO completes a lessons-learned review within 10 working days of closing a breach and agrees "
                "actions with the department concerned. A summary of breaches and near misses goes to the "
                "Management Board every quarter.",
            ),
        ],
    )


def law_court_bundles() -> None:
    text = "\n\n".join(
        [
            "COURT BUNDLE PREPARATION GUIDE",
            wrap(
                "Harrow & Vale LLP - Commercial Litigation - Practice note PN-07 - March 2025. This note explains "
                "how the department prepares hearing and trial bundles. Always follow any order or practice "
                "direction that applies to your case; where it differs from this note, the order wins."
            ),
            "PURPOSE",
            wrap(
                "A good bundle lets the judge find any document in seconds. A bad one costs hearing time, annoys "
                "the court and can lead to costs orders against the client. Start early: most bundle problems "
                "come from agreeing the index too late."
            ),
            "WHO DOES WHAT",
            "\n".join(
                [
                    "- The paralegal or trainee on the matter collects the documents and drafts the index.",
                    "- The associate checks the index against the order and reads the draft bundle through.",
                    "- The supervising partner approves the index before it goes to the other side.",
                    "- The Litigation Support Bundle Desk, on extension 2350, paginates, bookmarks and prints",
                    "  bundles. Send requests on the Bundle Desk form on the intranet, never by email alone.",
                ]
            ),
            "TIMETABLE",
            "\n".join(
                [
                    "- Send a draft index to the other side no later than 21 days before the hearing.",
                    "- Send the agreed draft bundle to counsel 10 days before the hearing.",
                    "- Lodge the trial bundle at court no later than 7 days before the start of the trial,",
                    "  unless the court has ordered otherwise.",
                    "- For hearings of one day or less, check the court's own guide: some courts want bundles",
                    "  only 2 clear days before.",
                ]
            ),
            "ELECTRONIC BUNDLES",
            wrap(
                "Most courts now want electronic bundles. Produce a single text-searchable PDF, bookmarked by "
                "section and by document, with the page numbers stamped on each page matching the PDF page "
                "numbers. Use a font of at least 12 point for anything we create. Keep each file under 50 MB; split "
                "larger bundles into volumes and name each file with the case number, the word Bundle and the "
                "volume number. Upload through the court's electronic filing system, or send a secure link if the "
                "court asks for one."
            ),
            "HARD COPY BUNDLES",
            wrap(
                "Where the court or counsel wants paper, use lever arch files with no more than 350 pages in each "
                "file, so that they open flat. Print single-sided unless the court allows double-sided copies. Put "
                "numbered divider tabs between sections and a spine label showing the case name, the claim number "
                "and the volume. Reprographics need two working days' notice for any bundle over 1,000 pages."
            ),
            "DELIVERY",
            wrap(
                "Bundles for courts in central London go by Swiftline Couriers, booked through the Bundle Desk. "
                "Book by 15:00 for delivery the same day. Always get proof of delivery and save it to the matter "
                "file, and send the other side and counsel confirmation that the bundle has been lodged."
            ),
            "FINAL CHECKLIST",
            "\n".join(
                [
                    "- Index agreed with the other side and matching the bundle exactly.",
                    "- Every page numbered, in order, with no gaps or duplicates.",
                    "- Personal data redacted where the order or the rules require it.",
                    "- Electronic bundle bookmarked, searchable and under the size limit.",
                    "- Copies for the judge, counsel, the witness box and our own team.",
                ]
            ),
        ]
    )
    mc.write_text("lawfirm/court-bundle-guide.txt", text)


def law_file_opening_email() -> None:
    pages = [
        [
            ("h1", "OpenMatter: File-Opening Quick Guide"),
            ("meta", "Harrow & Vale LLP - Risk and Compliance - April 2025"),
            ("h2", "Step 1 - Client details"),
            (
                "p",
                "Search for the client first. If the client already exists, select them; the form shows whether "
                "their CDD is in date. For a new client enter the full legal name, address and contact details, "
                "and for a company its registered number. The form fills in the Companies House details for you.",
            ),
            ("h2", "Step 2 - Matter details"),
            (
                "p",
                "Choose the matter type code from the list (the same codes as the Matter type codes table on the "
                "intranet), give a short description that a stranger would understand, name the supervising "
                "partner and enter your estimate of fees. Add every other party to the matter, including "
                "opponents, lenders and other side's solicitors.",
            ),
            ("h2", "Step 3 - Conflict search"),
            (
                "p",
                "The conflict search runs automatically against every party you have entered. Review each hit and "
                "record why it is or is not a conflict. Possible conflicts are referred to the Head of Risk before "
                "the form can be submitted.",
            ),
        ],
        [
            ("h2", "Step 4 - Risk and CDD"),
            (
                "p",
                "Complete the matter risk assessment. New clients are sent an electronic identity check link; "
                "upload any paper documents you have seen. The matter stays at 'pending' until the file-opening "
                "team approves the CDD.",
            ),
            ("h2", "Step 5 - Approval"),
            (
                "p",
                "Every new matter is approved by the supervising partner in OpenMatter. Matters with estimated "
                "fees over £50,000, or with a high risk rating, also need Risk Committee sign-off; the Committee "
                "considers requests every Monday and Thursday morning.",
            ),
            ("h2", "Step 6 - Engagement letter"),
            (
                "p",
                "Send the engagement letter and terms of business within 5 working days of opening, generated "
                "from the template in OpenMatter so that the correct rates and complaints wording are used. Save "
                "the signed copy to the matter.",
            ),
            ("h2", "Closing a matter"),
            (
                "p",
                "Close matters in OpenMatter when the work is finished: the form checks that the client ledger is "
                "at nil and that the final bill has been sent. Closed matters are archived after 30 days.",
            ),
        ],
    ]
    with tempfile.TemporaryDirectory() as tmp, rooted(Path(tmp)):
        mc.write_pdf(
            "file-opening-quick-guide.pdf",
            "OpenMatter: File-Opening Quick Guide",
            "Risk and Compliance",
            "Harrow & Vale LLP - OpenMatter quick guide",
            pages,
        )
        pdf = (Path(tmp) / "file-opening-quick-guide.pdf").read_bytes()
    PDF_ATTACHMENT_SOURCE["file-opening-quick-guide.pdf"] = mc.PDF_SOURCE.pop("file-opening-quick-guide.pdf")
    mc.write_eml(
        "lawfirm/email-new-file-opening-process.eml",
        {
            "From": "Tamsin Greaves <t.greaves@harrow-vale.example>",
            "To": "All fee earners <fee-earners@harrow-vale.example>",
            "Cc": "File Opening <file-opening@harrow-vale.example>",
            "Subject": "New file-opening process from 14 April 2025",
            "Date": "Wed, 02 Apr 2025 10:05:00 +0100",
            "Message-ID": "<20250402100500.greaves@harrow-vale.example>",
        },
        """
Dear all,

From Monday 14 April 2025 all new matters will be opened through OpenMatter, the new electronic
file-opening form on the intranet. It replaces the paper FO1 form and the email requests to the
file-opening team, which will no longer be accepted after Friday 11 April.

What changes for you:

- You complete the form yourself in OpenMatter. Secretaries can prepare it, but the fee earner
  must submit it.
- The conflict search and the CDD check run inside the form, so you see the results before you
  submit rather than days later.
- Once CDD is complete, the file-opening team aims to open matters for existing clients within 4
  working hours, and new-client matters within 1 working day.
- No time can be recorded to a matter until it is open. Time recorded to the old PENDING code
  after 14 April will not be transferred.

Drop-in training sessions of 30 minutes will be held in the Training Suite on the 3rd floor on
Tuesday 8 April and Thursday 10 April, at 12:30 and at 16:00. A recording will be on the intranet
for anyone who cannot attend.

The attached quick guide takes you through each step of the form. Questions about a particular
matter go to the file-opening team on extension 2260.

Thank you for your help with the change.

Tamsin

Tamsin Greaves
Head of Risk
Harrow & Vale LLP
""",
        attachment=("file-opening-quick-guide.pdf", "application/pdf", pdf),
        boundary="==evalset-boundary-lawfirm==",
    )


WRITERS = [
    hospital_transfusion,
    hospital_transport,
    hospital_pressure_ulcers,
    hospital_chaplaincy,
    hospital_interpreters,
    hospital_falls,
    hospital_bereavement,
    hospital_travel_email,
    law_aml,
    law_client_money,
    law_trainee_seats,
    law_expenses,
    law_matter_codes,
    law_data_breach,
    law_court_bundles,
    law_file_opening_email,
]


def write_all() -> None:
    for folder in ("hospital", "lawfirm"):  # start clean, so that no stale document survives a rename
        for old in (HERE / folder).glob("*"):
            if old.is_file():
                old.unlink()
    with rooted(HERE):
        for writer in WRITERS:
            writer()


# ------------------------------------------------------------------------------------------------
# Reading the documents back
# ------------------------------------------------------------------------------------------------
def documents() -> list[str]:
    return sorted(p.relative_to(HERE).as_posix() for d in ("hospital", "lawfirm") for p in (HERE / d).glob("*"))


def _pdf_pages(data: bytes) -> list[str]:
    from pypdf import PdfReader

    return [page.extract_text() or "" for page in PdfReader(io.BytesIO(data)).pages]


def extract(rel: str) -> dict:
    """The document's text by place, as the sample corpus's `extract` gives it ({page: text} for PDF and
    PPTX, {section: text} otherwise); e-mail attachments are read as well: a DOCX by its headings, any
    other attachment as one section named by its file name."""
    path = HERE / rel
    if path.suffix == ".csv":
        return {CSV_TABLES[rel]: path.read_text(encoding="utf-8")}
    if path.suffix == ".eml":
        message = BytesParser(policy=policy.default).parsebytes(path.read_bytes())
        sections = {str(message["Subject"]): message.get_body(("plain",)).get_content()}
        for part in message.iter_attachments():
            name, data = part.get_filename(), part.get_content()
            if name.endswith(".docx"):
                sections |= mc._docx_sections(data)
            elif name.endswith(".pdf"):
                pages = _pdf_pages(data)
                if len(pages) != len(PDF_ATTACHMENT_SOURCE.get(name, pages)):
                    raise SystemExit(f"{rel}: attachment {name} has {len(pages)} pages, not as written")
                sections[name] = "\n".join(pages)
            else:
                sections[name] = data if isinstance(data, str) else data.decode()
        return sections
    with rooted(HERE):
        return mc.extract(rel)


def sample_corpus_texts() -> dict[str, str]:
    """The sample corpus's documents (all but the image-only PDF), as whole normalised texts."""
    with rooted(SAMPLE_ROOT):
        rels = [r for r in mc.corpus_documents() if r != mc.SCANNED]
        return {f"sample_corpus/{r}": mc.normalise("\n".join(str(t) for t in mc.extract(r).values())) for r in rels}


def words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9][^\s,|]*", text)


def report(texts: dict[str, dict]) -> None:
    for rel in documents():
        size = (HERE / rel).stat().st_size
        count = len(words("\n".join(str(t) for t in texts[rel].values())))
        print(f"{rel:<52} {size:>7} bytes  {count:>5} words  {len(texts[rel]):>3} pages/sections")
        if not MIN_WORDS <= count <= MAX_WORDS:
            raise SystemExit(f"{rel}: {count} words, outside {MIN_WORDS} to {MAX_WORDS}")


# ------------------------------------------------------------------------------------------------
# Checking questions.yaml
# ------------------------------------------------------------------------------------------------
def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9£%]+(?:'[a-z]+)?", mc.normalise(text).lower())


def _ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def check_questions(texts: dict[str, dict]) -> list[dict]:
    import yaml

    questions = yaml.safe_load((HERE / "questions.yaml").read_text(encoding="utf-8"))
    if not isinstance(questions, list):
        raise SystemExit("questions.yaml must be a list")
    whole = {rel: mc.normalise("\n".join(str(t) for t in places.values())) for rel, places in texts.items()}
    sample = sample_corpus_texts()
    problems: list[str] = []
    seen_ids: set[str] = set()
    covered: Counter = Counter()
    allowed = {"id", "split", "kind", "question", "history", "document", "where", "answer", "absent"}
    for number, item in enumerate(questions, start=1):
        qid = item.get("id", f"#{number}") if isinstance(item, dict) else f"#{number}"
        label = f"{qid} ({item.get('question', '?')!r})" if isinstance(item, dict) else qid
        if not isinstance(item, dict) or not set(item) <= allowed:
            problems.append(f"{label}: unknown keys {sorted(set(item) - allowed) if isinstance(item, dict) else ''}")
            continue
        missing = {"id", "split", "kind", "question", "document", "answer"} - set(item)
        if missing:
            problems.append(f"{label}: missing {sorted(missing)}")
            continue
        if qid in seen_ids:
            problems.append(f"{label}: duplicate id")
        seen_ids.add(qid)
        if not re.fullmatch(r"[hlx]\d\d", str(qid)):
            problems.append(f"{label}: id must be h.., l.. (hospital, law firm) or x.. (off-topic)")
            continue
        org, kind = ORGS[qid[0]], item["kind"]
        if item["split"] not in ("tune", "test"):
            problems.append(f"{label}: split must be tune or test")
        if kind not in KINDS:
            problems.append(f"{label}: kind must be one of {KINDS}")
            continue
        if (kind == "off_topic") != (org is None):
            problems.append(f"{label}: off-topic questions, and only they, have ids x..")
        question = str(item["question"])
        history = item.get("history")
        if history is not None:
            roles = [turn.get("role") for turn in history] if isinstance(history, list) else None
            if not roles or roles != ["user", "assistant"] * (len(roles) // 2) or len(roles) % 2:
                problems.append(f"{label}: history must alternate user, assistant, ending with assistant")
            elif not all(isinstance(turn.get("content"), str) and turn["content"].strip() for turn in history):
                problems.append(f"{label}: every history turn needs content")
        if kind != "answerable":
            if item["document"] is not None or item["answer"] is not None or "where" in item:
                problems.append(f"{label}: unanswerable: document and answer null, no where")
            absent = item.get("absent")
            if kind == "on_topic":
                if not isinstance(absent, list) or not absent:
                    problems.append(f"{label}: on_topic needs a non-empty absent list")
                    continue
                for term in absent:
                    for rel, text in {**whole, **sample}.items():
                        if str(term).lower() in text.lower():
                            problems.append(f"{label}: meant to be unanswerable, but {rel} mentions {term!r}")
            elif absent:
                problems.append(f"{label}: absent is for on_topic questions only")
            continue
        # answerable
        if "absent" in item:
            problems.append(f"{label}: absent is for on_topic questions only")
        rel, where, answer = item["document"], item.get("where"), str(item["answer"])
        if rel not in texts:
            problems.append(f"{label}: no document {rel}")
            continue
        if rel.split("/")[0] != org:
            problems.append(f"{label}: id says {org}, document is in {rel.split('/')[0]}")
        covered[rel] += 1
        suffix = Path(rel).suffix
        key = "page" if suffix in (".pdf", ".pptx") else "section"
        if not isinstance(where, dict) or list(where) != [key]:
            problems.append(f"{label}: where must be {{{key}: ...}} for {suffix}")
            continue
        place = where[key]
        if place not in texts[rel]:
            problems.append(f"{label}: {rel} has no {key} {place!r}; it has {list(texts[rel])}")
            continue
        if mc.normalise(answer) not in mc.normalise(str(texts[rel][place])):
            problems.append(f"{label}: answer {answer!r} is not in {rel}, {key} {place!r}")
        if rel in mc.PDF_SOURCE and mc.normalise(answer) not in mc.normalise(mc.PDF_SOURCE[rel][place - 1]):
            problems.append(f"{label}: answer {answer!r} is not in the text written on {rel} page {place}")
        elsewhere = [other for other, text in whole.items() if other != rel and mc.normalise(answer) in text]
        if elsewhere:  # each answer must come from exactly one document
            problems.append(f"{label}: answer {answer!r} also appears in {', '.join(elsewhere)}")
        asked = " ".join([question, *(turn["content"] for turn in history or [])])
        if mc.normalise(answer).lower() in mc.normalise(asked).lower():
            problems.append(f"{label}: the question or its history gives the answer {answer!r} away")
        copied = _ngrams(_tokens(question), COPY_NGRAM) & _ngrams(_tokens(whole[rel]), COPY_NGRAM)
        if copied:
            problems.append(f"{label}: copies the document's wording: {sorted(' '.join(g) for g in copied)}")
    # the mix, the balance and the coverage
    counts = Counter((ORGS[str(q["id"])[0]], q["kind"], q["split"]) for q in questions if isinstance(q, dict))
    for org in ("hospital", "lawfirm", None):
        for kind in KINDS:
            tune, test = counts[(org, kind, "tune")], counts[(org, kind, "test")]
            if abs(tune - test) > 1:
                problems.append(f"{org or 'no organisation'} / {kind}: {tune} tune vs {test} test, not balanced")
    by_kind = Counter(q["kind"] for q in questions)
    follow = [q for q in questions if q.get("history")]
    follow_splits = Counter(q["split"] for q in follow)
    for kind, least in (("answerable", 44), ("on_topic", 12), ("off_topic", 10)):
        if by_kind[kind] < least:
            problems.append(f"only {by_kind[kind]} {kind} questions, want at least {least}")
    if len(follow) < 4 or abs(follow_splits["tune"] - follow_splits["test"]) > 1:
        problems.append(f"follow-ups: {len(follow)} ({dict(follow_splits)}), want at least 4, balanced")
    if any(q["kind"] != "answerable" for q in follow):
        problems.append("follow-ups are answerable questions")
    for rel in texts:
        if covered[rel] < 2:
            problems.append(f"{rel}: {covered[rel]} answerable question(s), want at least 2")
    # the sample corpus's own unanswerable questions must stay unanswerable with this set loaded too
    for sample_question, terms in mc.ABSENT_TERMS.items():
        for term in terms:
            for rel, text in whole.items():
                if term.lower() in text.lower():
                    problems.append(
                        f"{rel} mentions {term!r}, which the sample corpus needs absent ({sample_question})"
                    )
    if problems:
        print("\n".join(f"FAIL: {p}" for p in problems), file=sys.stderr)
        raise SystemExit(f"questions.yaml: {len(problems)} problem(s)")
    return questions


def summary(questions: list[dict]) -> None:
    def org_of(q: dict) -> str:
        return ORGS[q["id"][0]] or "none"

    print(f"questions.yaml: {len(questions)} questions check out against {len(documents())} documents")
    table = Counter((org_of(q), q["kind"], q["split"]) for q in questions)
    print(f"{'organisation':<10} {'kind':<11} {'tune':>5} {'test':>5}")
    for org in ("hospital", "lawfirm", "none"):
        for kind in KINDS:
            if table[(org, kind, "tune")] or table[(org, kind, "test")]:
                print(f"{org:<10} {kind:<11} {table[(org, kind, 'tune')]:>5} {table[(org, kind, 'test')]:>5}")
    formats = Counter(Path(q["document"]).suffix for q in questions if q["document"])
    print("answerable by format: " + ", ".join(f"{k} {v}" for k, v in sorted(formats.items())))
    follow = Counter(q["split"] for q in questions if q.get("history"))
    print(f"follow-ups (with history): {sum(follow.values())} (tune {follow['tune']}, test {follow['test']})")


def parse_with_appliance(questions: list[dict]) -> None:
    """Every document, and every attachment taken out of an e-mail, through ingest.partition; then every
    answer must be in the text the appliance gets (on the named page, for PDF and PPTX documents)."""
    from ingest.attachments import extract_attachments
    from ingest.partition import partition_document

    seen: dict[str, list] = {}
    for rel in documents():
        kind, elements = partition_document(HERE / rel)
        print(f"partitioned {rel}: {kind}, {len(elements)} elements")
        seen[rel] = list(elements)
        if kind == "eml":
            with tempfile.TemporaryDirectory() as tmp:
                for attachment in extract_attachments(HERE / rel, Path(tmp), max_bytes=50 * 2**20):
                    if attachment.path is None:
                        raise SystemExit(f"{rel}: attachment {attachment.name} skipped: {attachment.reason}")
                    kind, elements = partition_document(attachment.path)
                    print(f"  attachment {attachment.name}: {kind}, {len(elements)} elements")
                    seen[rel] += elements
    problems = []
    for q in questions:
        if q["kind"] != "answerable":
            continue
        elements, page = seen[q["document"]], q["where"].get("page")
        if page is not None:
            elements = [e for e in elements if e.page == page]
        text = mc.normalise(" ".join(e.text for e in elements))
        if mc.normalise(str(q["answer"])) not in text:
            problems.append(f"{q['id']}: answer {q['answer']!r} not in the partitioned text of {q['document']}"
                            + (f" page {page}" if page else ""))  # fmt: skip
    if problems:
        print("\n".join(f"FAIL: {p}" for p in problems), file=sys.stderr)
        raise SystemExit(f"partitioning: {len(problems)} problem(s)")
    print("every answer is in the text the appliance's partitioner gets")


def main() -> int:
    sys.dont_write_bytecode = True
    write_all()
    texts = {rel: extract(rel) for rel in documents()}
    report(texts)
    questions = check_questions(texts)
    summary(questions)
    if "--parse" in sys.argv[1:]:
        parse_with_appliance(questions)
    return 0


if __name__ == "__main__":
    sys.exit(main())
