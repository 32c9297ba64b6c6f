"""Rule detectors: prompt injection and jailbreak phrasing, harmful requests, and invalid
keywords, in English and French.

Rules run on folded text (lower case, no accents, leetspeak undone), so "IGNORE", "1gn0re"
and "ignorez" match alike. They are precise by design; the embedding head (`head.py`) adds
recall on phrasings no rule lists. Patterns are plain data: extend them per deployment with
`guardrails` settings (invalid keywords) or replace the rail's detector.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ragstream.infra.guard.base import fold
from ragstream.schemas.guard import GuardFinding

__all__ = ["HARM_CATEGORIES", "InjectionRules", "KeywordRules", "SafetyRules"]

HARM_CATEGORIES = ("violence_weapons", "self_harm", "hate_harassment", "crime_drugs", "sexual")


@dataclass(frozen=True)
class _Rule:
    category: str
    pattern: re.Pattern[str]
    score: float


def _rules(category: str, score: float, patterns: Iterable[str]) -> list[_Rule]:
    return [_Rule(category, re.compile(p), score) for p in patterns]


# -- prompt injection and jailbreak ---------------------------------------------------------
_IGNORE = r"(ignore|disregard|forget|override|bypass|skip|drop)"
_IGNORE_FR = r"(ignore[rsz]?|oublie[rsz]?|ne tiens pas compte|ne tenez pas compte|fais abstraction|faites abstraction|contourne[rsz]?|passe[rsz]? outre)"
_PRIOR = r"(all |any |the |your |my |these |those |every )?(previous|prior|above|earlier|preceding|original|initial|system|safety|former)?\s?(instructions?|prompts?|rules?|directives?|guidelines?|context|constraints?|polic(y|ies)|restrictions?|programming)"
_PRIOR_FR = r"(toutes |tes |vos |les |ces |l'|la |le )?(instructions?|consignes?|regles?|directives?|contraintes?|restrictions?|prompt|politiques?)( (precedentes?|anterieures?|initiales?|systeme|ci-dessus|de securite))?"

INJECTION_PATTERNS: dict[str, list[str]] = {
    "ignore_instructions": [
        rf"\b{_IGNORE}\b.{{0,40}}\b{_PRIOR}",
        rf"\b{_IGNORE_FR}\b.{{0,40}}\b{_PRIOR_FR}",
        r"\bnew (instructions?|rules?|task)\s*:",
        r"\b(nouvelles?|nouveau) (instructions?|consignes?|regles?|tache)\s*:",
        r"\bfrom now on,? (you|ignore|answer|respond|act)",
        r"\ba partir de maintenant,? (tu|vous|reponds|repondez|ignore|agis|agissez)",
        r"\binstead,? (reply|respond|answer|say|output|print) (only )?(with|that|:)",
        r"\bau lieu de (cela|ca|repondre),? (reponds|repondez|ecris|ecrivez|affiche|dis|dites)",
    ],
    "role_play_jailbreak": [
        r"\b(dan|do anything now|developer mode|jailbreak(ed)?|god mode|unrestricted mode|evil (ai|assistant|mode))\b",
        r"\byou are (now )?(no longer|not) (bound|restricted|an? (ai|assistant))",
        r"\b(pretend|imagine|act as if|suppose) (that )?you (are|have) (no|an? unrestricted|an? unfiltered|without)",
        r"\b(without|no) (any )?(restrictions?|filters?|limits?|censorship|guidelines|rules|ethic)",
        r"\bmode (developpeur|sans restriction|sans filtre|dieu)\b",
        r"\b(fais|faites|imagine[sz]?) (comme si|semblant que) (tu|vous) (n'avais|n'aviez|etais|etiez) (aucune|plus de|sans)",
        r"\bsans (aucune )?(restriction|filtre|censure|limite|regle)s?\b",
        r"\b(tu n'es plus|vous n'etes plus) (un|une|soumis|limite)",
        r"\bstay in character\b|\breste dans (ton|le) personnage\b",
    ],
    "system_prompt_extraction": [
        r"\b(reveal|show|print|repeat|output|display|tell me|give me|leak|dump)\b.{0,30}\b(system|hidden|initial|original|secret|developer) (prompt|instructions?|message|rules)",
        r"\b(what|which) (are|were|is) (your|the) (system|hidden|initial|original) (prompt|instructions?)",
        r"\b(revele|montre|affiche|repete|donne|divulgue|recopie)[rsz]?\b.{0,30}\b(prompt|instructions?|consignes?|message) (systeme|cachees?|initiales?|secretes?|d'origine)",
        r"\b(quelles sont|quel est) (tes|vos|ton|votre) (instructions?|consignes?|prompt) (systeme|cachees?|initiales?|secretes?)",
        r"\brepeat (everything|all|the text) (above|before)\b|\brepete (tout|le texte) (ci-dessus|au-dessus|avant)",
    ],
    "indirect": [
        r"\b(note|message|instruction)s? (to|for) (the )?(ai|assistant|llm|model|chatbot|language model)\b",
        r"\b(note|message|instruction|consigne)s? (a|pour) (l'|le |la )?(ia|assistant|intelligence artificielle|modele|chatbot)\b",
        r"\b(ai|assistant|llm|chatbot)s?\s*[:,]\s*(ignore|disregard|do not|don't|instead|you must|reply|respond)",
        r"\b(ia|assistant|chatbot)\s*[:,]\s*(ignore|ne |au lieu|tu dois|vous devez|reponds|repondez)",
        r"<!--.{0,80}\b(ai|assistant|ia|ignore|instruction|prompt)",
        r"\b(when|if) (an? )?(ai|assistant|llm|chatbot) (reads|summari[sz]es|processes|sees) this",
        r"\b(si|lorsqu'|quand) (une |un |l')?(ia|assistant|chatbot) (lit|resume|traite|voit) (ce|cette)",
    ],
    "exfiltration": [
        # Sending *the conversation, secrets or everything* somewhere; "email the report to
        # me@corp.example" is an ordinary request.
        r"\b(send|post|forward|email|upload|exfiltrate|leak|copy)\b.{0,30}\b(conversation|chat|history|system prompt|"
        r"prompt|instructions|secrets?|passwords?|credentials|tokens?|api keys?|(user|customer|personal) data|"
        r"everything|all (of )?(the|this|your|my))\b.{0,40}\b(to|at) (https?://|[\w.-]+@[\w.-]+)",
        r"\b(envoie|envoyez|transfere|transferez|poste[rz]?|copie[rz]?)\b.{0,30}\b(conversation|historique|"
        r"prompt|instructions|secrets?|mots? de passe|identifiants|jetons?|cles? api|donnees|tout)\b.{0,40}"
        r"\b(a|vers|sur) (https?://|[\w.-]+@[\w.-]+)",
        r"!\[[^\]]*\]\(https?://[^)]*\?(data|q|secret|token)=",
        r"\b(the |your |the admin |l'|le |les )?(admin(istrator)? )?(password|passwords|api key|mot de passe|mots de passe|cle api|credentials?|identifiants)\b.{0,30}\b(reply|respond|include|print|give|donne|ecris|affiche|reponds)",
        r"\b(reply|respond|answer|include|print|give|output)\b.{0,40}\b(admin(istrator)? )?(password|api key|credentials|secrets?)\b",
        r"\b(reponds|repondez|donne|donnez|ecris|affiche|inclus)\b.{0,40}\b(mot de passe|mots de passe|cle api|identifiants|secrets?)\b",
    ],
}

# -- harmful requests ----------------------------------------------------------------------
_HOW = r"(how (do|can|could|would|should) (i|you|we|one|someone)|how to|ways? to|steps? to|instructions? (for|to|on)|guide (to|for|on)|tutorial|teach me|tell me how|explain how|show me how|help me|i want to|i need to|best way to|easiest way to|recipe for|give me (a |the )?(recipe|steps|instructions|method))"
_HOW_FR = r"(comment (je peux|puis-je|peut-on|on peut|faire pour|faut-il)?|comment|moyens? de|etapes? pour|instructions? pour|guide pour|tutoriel|apprends-moi|explique(-moi|z-moi)? comment|montre(-moi|z-moi)? comment|aide(-moi|z-moi) a|je veux|je voudrais|j'ai besoin de|meilleure facon de|recette (de|pour|du|des)|donne(-moi|z-moi) (la recette|les etapes|la methode))"
_MAKE = r"(make|build|construct|assemble|create|manufacture|synthesi[sz]e|cook|brew|produce|get|buy|obtain|acquire|smuggle|3d[- ]print|convert)"
_MAKE_FR = r"(fabriquer|construire|assembler|creer|produire|synthetiser|cuisiner|preparer|obtenir|acheter|me procurer|se procurer|trouver|faire passer|passer en fraude|imprimer en 3d|convertir|faire)"
_WEAPON = r"(bombs?|pipe bombs?|explosives?|ieds?|grenades?|molotov|napalm|thermite|detonators?|nerve (agent|gas)|sarin|ricin|anthrax|bioweapons?|chemical weapons?|(untraceable|ghost|unregistered|automatic) (guns?|firearms?|weapons?)|silencers?|suppressors?|(full[- ]auto|auto[- ]sear))"
_WEAPON_FR = r"(bombes?|engins? explosifs?|explosifs?|grenades?|cocktails? molotov|napalm|thermite|detonateurs?|gaz (sarin|innervant)|ricine|armes? (chimiques?|biologiques?|intracables?|fantomes?|automatiques?|non declarees?)|silencieux)"
_DRUG = r"(meth(amphetamine)?|crystal meth|cocaine|crack|heroin|fentanyl|lsd|mdma|ecstasy|ghb|date[- ]rape drugs?|roofies|counterfeit (money|bills|currency))"
_DRUG_FR = r"(meth(amphetamine)?|cocaine|crack|heroine|fentanyl|lsd|mdma|ecstasy|ghb|drogue du violeur|faux billets|fausse monnaie)"

_PERSON = r"(someone|somebody|people|person|a man|a woman|a child|a kid|him|her|them|my (coworker|colleague|boss|manager|neighbou?r|wife|husband|girlfriend|boyfriend|partner|father|mother|dad|mom|brother|sister|teacher|ex)|(a|the|my) (coworker|colleague|boss|neighbou?r|cop|police officer|teacher|classmate|president|witness))"
_PERSON_FR = r"(quelqu'un|des gens|une personne|un homme|une femme|un enfant|(mon|ma|le|la|un|une) (collegue|patron|patronne|chef|voisin|voisine|femme|mari|copain|copine|pere|mere|frere|soeur|prof|professeur|ex|policier|temoin))"

HARM_PATTERNS: dict[str, list[str]] = {
    "violence_weapons": [
        rf"\b{_HOW}\b.{{0,40}}\b{_MAKE}\b.{{0,30}}\b{_WEAPON}",
        rf"\b{_HOW_FR}\b.{{0,40}}\b{_MAKE_FR}\b.{{0,30}}\b{_WEAPON_FR}",
        rf"\b(how (do|can|could|would) i|how to|best way to|help me|i want to|i'm going to)\b.{{0,20}}\b(kill|murder|poison|strangle|stab|shoot|hurt|injure|maim|torture|beat up)\b.{{0,12}}\b{_PERSON}\b",
        rf"\b(comment|meilleure facon de|aide-moi a|je veux|je vais)\b.{{0,20}}\b(tuer|assassiner|empoisonner|etrangler|poignarder|blesser|torturer|abattre|tabasser)\b.{{0,12}}\b{_PERSON_FR}\b",
        r"\b(plan|planning|carry out|organi[sz]e) (a |an )?(mass shooting|school shooting|terror(ist)? attack|massacre|bombing)",
        r"\b(planifier|organiser|preparer|commettre) (une |un )?(fusillade|attentat|massacre|tuerie)",
        r"\bmaximi[sz]e (casualties|the damage|deaths)\b|\bfaire le plus de (victimes|morts|degats)\b",
    ],
    "self_harm": [
        r"\b(how (do|can|should) i|best way to|easiest way to|painless way to|quickest way to|ways? to|want to|going to|help me) (kill myself|end my (own )?life|commit suicide|take my (own )?life|hurt myself|cut myself|harm myself|overdose|starve myself)",
        r"\b(comment|meilleure facon de|moyen (le plus )?(simple|rapide|indolore) de|je veux|je vais|aide-moi a) (me suicider|mettre fin a mes jours|me tuer|en finir|me faire du mal|me mutiler|me scarifier|faire une overdose|m'ouvrir les veines)",
        r"\b(how many|what dose of|quantity of) .{0,30}(pills|tablets|paracetamol|acetaminophen|ibuprofen|sleeping pills).{0,30}(to die|lethal|kill (me|myself|a person)|fatal)",
        r"\b(combien de|quelle dose de) .{0,30}(comprimes|cachets|paracetamol|somniferes|doliprane).{0,30}(pour mourir|mortelle?|letale?|pour me tuer)",
        r"\b(i (want|wish) to die|i don't want to live|je veux mourir|je ne veux plus vivre|j'ai envie de mourir)\b",
    ],
    "hate_harassment": [
        r"\b(write|compose|generate|draft|create|give me)\b.{0,40}\b(racist|sexist|homophobic|transphobic|antisemitic|islamophobic|hateful|degrading|dehumani[sz]ing)\b",
        r"\b(ecris|ecrivez|redige[rz]?|compose[rz]?|genere[rz]?|donne-moi)\b.{0,40}\b(racistes?|sexistes?|homophobes?|transphobes?|antisemites?|islamophobes?|haineux|haineuse|degradants?|deshumanisants?)",
        r"\b(are|is) (all )?(subhuman|vermin|animals|parasites|inferior|a disease|cockroaches)\b",
        r"\b(sont|est) (tous |toutes )?(des )?(sous-hommes|vermines?|parasites|animaux|inferieur(e)?s|cafards|une maladie)\b",
        r"\b(harass|bully|intimidate|threaten|stalk|dox+|humiliate)\b.{0,30}\b(my|a|an|the|this|her|him|them|coworker|colleague|ex)\b",
        r"\b(harceler|intimider|menacer|traquer|humilier)\b.{0,30}\b(mon|ma|mes|un|une|le|la|cette|ce|collegue|ex)\b",
        r"\b(you|ur) (are|r) (a |an |so )?(stupid|idiot|moron|worthless|pathetic|useless|disgusting|fat|ugly|retard(ed)?)\b.{0,15}\b(piece of|bitch|loser|freak|trash)?",
        r"\b(t'es|tu es|vous etes|espece d') ?(un |une )?(con|conne|connard|connasse|abruti|abrutie|idiot|idiote|debile|minable|nul|nulle|pauvre type|ordure|salope|batard)\b",
        r"\b(fuck (you|off)|piece of shit|go to hell|shut up,? (you|idiot)|ta gueule|va te faire foutre|va chier|ferme-la)\b",
        r"\b(kill|hang|gas|shoot|deport) (all )?(the )?(jews|muslims|blacks|gays|immigrants|women|arabs|christians|asians)\b",
        r"\b(tuer|gazer|deporter|pendre) (tous )?(les )?(juifs|musulmans|noirs|homosexuels|immigres|femmes|arabes|chretiens|asiatiques)\b",
    ],
    "crime_drugs": [
        rf"\b{_HOW}\b.{{0,40}}\b{_MAKE}\b.{{0,30}}\b{_DRUG}",
        rf"\b{_HOW_FR}\b.{{0,40}}\b{_MAKE_FR}\b.{{0,30}}\b{_DRUG_FR}",
        r"\b(how (do|can) i|how to|help me|best way to|teach me to)\b.{0,20}\b(launder money|steal (a |someone'?s? )?(car|identity|credit card|password)|pick a lock to (break|get) into|break into (a |someone'?s? )?(house|home|car|account)|hotwire|shoplift|rob (a|the)|evade taxes|hack into|phish|skim (credit )?cards|forge (a |an )?(passport|id|signature|documents?)|blackmail|extort)",
        r"\b(comment|aide-moi a|apprends-moi a)\b.{0,20}\b(blanchir de l'argent|voler (une voiture|l'identite|une carte|un mot de passe)|cambrioler|forcer une serrure pour entrer|pirater (le compte|un compte|le reseau)|hameconner|frauder le fisc|falsifier (un passeport|une signature|des documents)|faire chanter|racketter|voler dans un magasin)",
        r"\b(write|create|build|code)\b.{0,20}\b(ransomware|keylogger|malware|botnet|phishing (email|page|kit)|credential stealer)\b",
        r"\b(ecris|ecrivez|cree|creez|code)\b.{0,20}\b(rancongiciel|ransomware|keylogger|logiciel malveillant|malware|botnet|e-mail d'hameconnage|page de phishing)\b",
        r"\b(where|how) (can i|to|do i) (buy|get|order)\b.{0,30}\b(drugs|cocaine|heroin|meth|fentanyl|weed illegally|stolen (cards|credit cards)|fake (ids?|passports?))",
        r"\b(ou|comment) (acheter|trouver|commander|me procurer)\b.{0,30}\b(drogues?|cocaine|heroine|meth|fentanyl|cartes volees|faux papiers|faux passeports?)",
    ],
    "sexual": [
        r"\b(write|describe|generate|tell me|give me|create)\b.{0,40}\b(explicit|graphic|erotic|pornographic|x-rated|nsfw|steamy|sexual)\b.{0,30}\b(story|scene|content|fantasy|description|roleplay|sex)",
        r"\b(ecris|ecrivez|decris|decrivez|raconte|racontez|genere[rz]?|donne-moi)\b.{0,40}\b(explicite|erotique|pornographique|sexuel(le)?|torride|cru(e)?)\b",
        r"\b(sext|nudes?|porn|hentai|sex chat)\b",
        r"\b(photos? (nue|denudee)s?|porno|pornographie|sexe explicite)\b",
        r"\bdescribe .{0,20}(having sex|naked body|sexual acts?|intercourse)\b|\bdecri[st] .{0,20}(rapport sexuel|corps nu|acte sexuel)",
    ],
}


class _RuleSet:
    name: str
    rail: str

    def __init__(self, rules: Sequence[_Rule], *, rail: str, name: str) -> None:
        self._rules = list(rules)
        self.rail = rail
        self.name = name

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def detect(self, text: str, *, lang: str) -> list[GuardFinding]:
        return self.scan(text)

    def scan(self, text: str) -> list[GuardFinding]:
        folded = fold(text)
        variants = {folded, fold(text, leet=True)}
        variants |= _decoded_variants(text)
        found: dict[str, GuardFinding] = {}
        for rule in self._rules:
            for v in variants:
                m = rule.pattern.search(v)
                if m is not None:
                    prev = found.get(rule.category)
                    if prev is None or prev.score < rule.score:
                        # Offsets are into the folded text; folding keeps lengths for most
                        # text, so they locate the span closely but not exactly.
                        found[rule.category] = GuardFinding(
                            rail=self.rail,
                            category=rule.category,
                            score=rule.score,
                            start=m.start() if v is folded else None,
                            end=m.end() if v is folded else None,
                            detector=self.name,
                        )
                    break
        return list(found.values())


def _decoded_variants(text: str) -> set[str]:
    """Base64 runs and spaced-out letters ("i g n o r e"), decoded: obfuscation attempts."""
    out: set[str] = set()
    for run in re.findall(r"[A-Za-z0-9+/]{24,}={0,2}", text):
        try:
            decoded = base64.b64decode(run + "=" * (-len(run) % 4), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            continue
        if decoded.isprintable():
            out.add(fold(decoded, leet=True))
    spaced = re.sub(r"(?<=\b\w) (?=\w\b)", "", text)
    if spaced != text:
        out.add(fold(spaced, leet=True))
    dotted = re.sub(r"(?<=\w)[.\-_*](?=\w)", "", text)
    if dotted != text:
        out.add(fold(dotted, leet=True))
    return out


class InjectionRules(_RuleSet):
    """Prompt injection and jailbreak phrasing (category `injection`, subtype in the rule)."""

    def __init__(self, score: float = 0.9) -> None:
        rules = [
            r for sub, pats in INJECTION_PATTERNS.items() for r in _rules(f"injection:{sub}", score, pats)
        ]
        super().__init__(rules, rail="injection", name="rules")


class SafetyRules(_RuleSet):
    """Requests for operational harm, by category (`violence_weapons`, `self_harm`, ...)."""

    def __init__(self, score: float = 0.9) -> None:
        rules = [r for cat, pats in HARM_PATTERNS.items() for r in _rules(cat, score, pats)]
        super().__init__(rules, rail="safety", name="rules")


class KeywordRules(_RuleSet):
    """Invalid keywords from a policy: whole words or phrases, case and accent insensitive."""

    def __init__(self, keywords: Iterable[str]) -> None:
        rules = [
            _Rule(f"keyword:{k}", re.compile(rf"(?<!\w){re.escape(fold(k))}(?!\w)"), 1.0)
            for k in keywords
            if fold(k)
        ]
        super().__init__(rules, rail="keywords", name="keywords")
