#!/usr/bin/env python3
"""Builds node/src/llm/guard_corpus.tsv: the labelled set the prompt guard's rates are
measured on (docs/llm.md, "Prompt guard"). Each line is `label<TAB>text`; the label is the
class the text holds (secret, card, email, phone) or `none`. Texts are made from templates
with a fixed seed, so the file is the same on every run:

    python3 benches/guard_corpus.py > node/src/llm/guard_corpus.tsv
    python3 benches/guard_corpus.py --held-out > node/src/llm/guard_heldout.tsv

Negatives are chosen to be hard: numbers of every other kind (dates, times, versions, IP
addresses, ids, prices, hashes, UUIDs, coordinates, ISBNs), words that go with secrets
without one, handles and decorators with an @."""

import random
import string
import sys

# `--held-out`: a second set, other seed and other wording, never used to tune the guard.
HELD_OUT = "--held-out" in sys.argv
rng = random.Random(7 if HELD_OUT else 20261207)


def luhn_complete(prefix, length):
    digits = [int(c) for c in prefix]
    while len(digits) < length - 1:
        digits.append(rng.randrange(10))
    for check in range(10):
        cand = digits + [check]
        s = 0
        for i, d in enumerate(reversed(cand)):
            if i % 2 == 1:
                d *= 2
                if d > 9:
                    d -= 9
            s += d
        if s % 10 == 0:
            return "".join(map(str, cand))


def grouped(num, groups, sep):
    out, i = [], 0
    for g in groups:
        out.append(num[i:i + g])
        i += g
    return sep.join(out)


def rand(chars, n):
    return "".join(rng.choice(chars) for _ in range(n))


AZ09 = string.ascii_letters + string.digits
lines = []

# Cards: major schemes, grouped as people write them.
schemes = [("4", 16, [4, 4, 4, 4]), ("51", 16, [4, 4, 4, 4]), ("55", 16, [4, 4, 4, 4]),
           ("2221", 16, [4, 4, 4, 4]), ("34", 15, [4, 6, 5]), ("37", 15, [4, 6, 5]),
           ("6011", 16, [4, 4, 4, 4]), ("65", 16, [4, 4, 4, 4]), ("3530", 16, [4, 4, 4, 4]),
           ("4", 13, [13])]
card_templates = ["My card is {}.", "Charge {} please", "card number: {}", "{} exp 12/27 cvv 123",
                  "Use the Visa ending in {} no wait the full one {}", "billing: {} (personal)"]
for i in range(50):
    prefix, length, groups = schemes[i % len(schemes)]
    num = luhn_complete(prefix, length)
    text = grouped(num, groups, rng.choice([" ", "-", ""]))
    t = card_templates[i % len(card_templates)]
    lines.append(("card", t.format(text[-4:], text) if t.count("{}") == 2 else t.format(text)))

# Emails.
domains = ["example.com", "mail.example.org", "corp.example.co.uk", "example.io", "uni.example.edu",
           "example.de", "sub.domain.example.net"]
email_templates = ["Contact me at {}", "email: {}", "Send the report to {} by Friday.",
                   "cc {}, thanks", "<{}>", "reach {} or my manager"]
for i in range(50):
    local = rng.choice(["ada", "j.smith", "first.last+news", "team-ops", "x_y", "o'neil", "user123"])
    local = local.replace("'", "")
    addr = f"{local}@{domains[i % len(domains)]}"
    lines.append(("email", email_templates[i % len(email_templates)].format(addr)))

# Phones.
def d(n):
    return "".join(str(rng.randrange(10)) for _ in range(n))

phone_forms = [lambda: f"({d(3)}) {d(3)}-{d(4)}", lambda: f"{d(3)}-{d(3)}-{d(4)}",
               lambda: f"+1 {d(3)} {d(3)} {d(4)}", lambda: f"+44 20 {d(4)} {d(4)}",
               lambda: f"020 {d(4)} {d(4)}", lambda: f"+33 1 {d(2)} {d(2)} {d(2)} {d(2)}",
               lambda: f"+49 30 {d(4)} {d(4)}", lambda: f"+91 {d(5)} {d(5)}",
               lambda: f"+{d(11)}", lambda: f"{d(3)}.{d(3)}.{d(4)}"]
phone_templates = ["Call me on {}", "phone: {}", "My number is {} after 6pm", "tel {}",
                   "text {} when you land"]
for i in range(50):
    lines.append(("phone", phone_templates[i % len(phone_templates)].format(phone_forms[i % len(phone_forms)]())))

# Secrets.
secret_forms = [lambda: "sk-" + rand(AZ09, 48), lambda: "sk-proj-" + rand(AZ09 + "_-", 40),
                lambda: "sk-ant-api03-" + rand(AZ09 + "_-", 60), lambda: "AKIA" + rand(string.ascii_uppercase + string.digits, 16),
                lambda: "ghp_" + rand(AZ09, 36), lambda: "github_pat_" + rand(AZ09 + "_", 60),
                lambda: "xoxb-" + d(12) + "-" + rand(AZ09, 24), lambda: "AIza" + rand(AZ09 + "_-", 35),
                lambda: "-----BEGIN RSA PRIVATE KEY-----\\nMIIEow...", lambda: "sk_live_" + rand(AZ09, 24),
                lambda: "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0." + rand(AZ09 + "_-", 43),
                lambda: "password=" + rand(AZ09, 16), lambda: "api_key: " + rand(AZ09, 32),
                lambda: "tgk_" + rand(AZ09, 10) + "_" + rand(AZ09, 32)]
secret_templates = ["here is my key {}", "export OPENAI_API_KEY={}", "config: {}", "why does {} not work?",
                    "token {} expired"]
for i in range(56):
    lines.append(("secret", secret_templates[i % len(secret_templates)].format(secret_forms[i % len(secret_forms)]())))

# Negatives.
neg = []
neg += [f"The meeting is on 2026-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d} at {rng.randrange(24):02d}:{rng.randrange(60):02d}." for _ in range(20)]
neg += [f"Upgrade from version {rng.randrange(10)}.{rng.randrange(30)}.{rng.randrange(100)} to {rng.randrange(10)}.{rng.randrange(30)}.{rng.randrange(100)}" for _ in range(15)]
neg += [f"Server {rng.randrange(1, 255)}.{rng.randrange(255)}.{rng.randrange(255)}.{rng.randrange(255)} returned 502" for _ in range(15)]
neg += [f"Order #{d(8)} shipped, tracking {d(12)}" for _ in range(15)]
neg += [f"Total: ${rng.randrange(1, 999)},{d(3)}.{d(2)} for {rng.randrange(2, 50)} items" for _ in range(10)]
neg += [f"commit {rand('0123456789abcdef', 40)} fixed it" for _ in range(10)]
neg += [f"request id {rand('0123456789abcdef', 8)}-{rand('0123456789abcdef', 4)}-{rand('0123456789abcdef', 4)}-{rand('0123456789abcdef', 4)}-{rand('0123456789abcdef', 12)}" for _ in range(10)]
neg += [f"Coordinates {rng.uniform(-90, 90):.6f}, {rng.uniform(-180, 180):.6f}" for _ in range(10)]
neg += [f"ISBN 978-{d(1)}-{d(3)}-{d(5)}-{d(1)}" for _ in range(10)]
neg += [f"Population grew from {rng.randrange(1, 9)},{d(3)},{d(3)} to {rng.randrange(1, 9)},{d(3)},{d(3)}" for _ in range(10)]
neg += [f"Call the function with n={d(4)} and m={d(3)}" for _ in range(5)]
neg += [f"The range is {d(3)}-{d(3)} inclusive" for _ in range(5)]
neg += [f"SKU {d(3)}-{d(3)}-{d(3)} is out of stock" for _ in range(5)]
neg += [f"Invoice {d(10)} is overdue" for _ in range(10)]
neg += [f"timestamp {rng.randrange(1600000000, 1800000000)}{d(3)}" for _ in range(10)]
neg += [f"matrix [[{d(2)}, {d(2)}, {d(2)}], [{d(2)}, {d(2)}, {d(2)}]]" for _ in range(5)]
neg += ["Reset your password from the settings page.", "Where do I find my API key?",
        "The secret to good bread is time.", "Tokens are counted per request.",
        "Follow @tollgate for updates", "Use the @Override annotation", "npm i @scope/package",
        "The access token expires after an hour", "password: see the vault", "my email is on my profile",
        "Ping me at name at example dot com", "user@localhost cannot send mail", "Call 911 in an emergency",
        "Dial extension 4412 for support", "Room 1204, floor 12", "The answer is 42.",
        "x = 3.14159265358979", "Chapter 11, verse 3-16", "It costs 1234 5678 yen? No, 12,345 yen.",
        "Score: 98-87 in overtime", "Flight BA 2490 departs 14:35 from gate 22",
        "Use sk- as a prefix for secret keys in docs", "The JWT header starts with eyJ",
        "AKIA is the prefix of AWS access key ids", "PEM files begin with -----BEGIN CERTIFICATE-----"]
for t in ["Summarize this article about climate policy.", "Translate 'good morning' to French.",
          "Write a haiku about autumn.", "What is the capital of Australia?",
          "Explain the difference between TCP and UDP.", "Refactor this function to be async.",
          "List three uses of baking soda.", "How many tokens does this prompt use?",
          "Compare Rust and Go for network services.", "Draft a polite reminder about the invoice."]:
    neg += [t] * 2
# Hard cases: lists of years, rows of figures and long account ids look like phones and
# cards (a random 16-digit id that starts like a card passes Luhn one time in ten).
neg += [f"Sales in {y} {y + 1} {y + 2} rose steadily" for y in (rng.randrange(1990, 2024) for _ in range(10))]
neg += [f"Q{rng.randrange(1, 5)} figures: {d(3)} {d(3)} {d(4)}" for _ in range(10)]
neg += [f"account {d(16)}" for _ in range(20)]
neg += [f"ref {rng.choice('456')}{d(15)}" for _ in range(10)]
rng.shuffle(neg)
lines += [("none", t) for t in neg]

if HELD_OUT:
    # Other wording for every class, and other clean texts.
    lines = []
    for i in range(50):
        prefix, length, groups = schemes[(i * 3) % len(schemes)]
        num = luhn_complete(prefix, length)
        lines.append(("card", rng.choice([
            "pls refund to {} asap", "I paid with {} yesterday", "the number on my credit card is {}",
            "{} is the card I want to use", "debit {} got declined"]).format(
                grouped(num, groups, rng.choice([" ", "-", " ", ""])))))
        addr = rng.choice(["maria.garcia", "bob", "it-support", "k.tanaka+billing", "ops2024"]) + "@" + rng.choice(
            ["example.com", "example.co.jp", "mail.example.fr", "example.travel"])
        lines.append(("email", rng.choice(["forward it to {}", "{} wrote yesterday", "Reply-To: {}",
                                           "is {} still valid?", "from {} to the team"]).format(addr)))
        lines.append(("phone", rng.choice(["ring me at {}", "my cell: {}", "WhatsApp {}", "fax {}",
                                           "contact number {}"]).format(phone_forms[(i * 7) % len(phone_forms)]())))
        lines.append(("secret", rng.choice(["leaked: {}", "the CI uses {} for deploys", "{} (rotate me)",
                                            "set Authorization to Bearer {}"]).format(secret_forms[(i * 5) % len(secret_forms)]())))
    clean = []
    clean += [f"Between {d(3)} and {d(4)} users signed up" for _ in range(20)]
    clean += [f"Build {d(4)}.{d(2)}.{d(3)} passed in {rng.randrange(2, 90)}s" for _ in range(20)]
    clean += [f"Patient id {d(9)} seen on {rng.randrange(1, 29)}/{rng.randrange(1, 13)}/2026" for _ in range(20)]
    clean += [f"GPS {rng.uniform(-90, 90):.5f} {rng.uniform(-180, 180):.5f}" for _ in range(20)]
    clean += [f"Table row: {d(2)} {d(3)} {d(4)} {d(3)}" for _ in range(20)]
    clean += [f"container {rand('0123456789abcdef', 12)} restarted" for _ in range(20)]
    clean += [f"Years {y}, {y + 1} and {y + 2} were dry" for y in (rng.randrange(1950, 2024) for _ in range(20))]
    clean += [f"cost center {d(6)}-{d(4)}" for _ in range(20)]
    clean += [f"serial {rng.choice('3456')}{d(15)}" for _ in range(20)]
    clean += [rng.choice(["Tell me a joke about cats.", "What is 12 times 34?", "Sort these: 9, 2, 7, 4",
                          "Is 4111 a prime number?", "Explain @media queries in CSS",
                          "What does HTTP 429 mean?", "Generate a password policy document",
                          "How do I rotate an API key safely?"]) for _ in range(60)]
    lines += [("none", t) for t in clean]

rng.shuffle(lines)
print("# The prompt guard's labelled set (benches/guard_corpus.py makes it): label<TAB>text")
for label, text in lines:
    print(f"{label}\t{text}")
