"""Answer-quality judges: each answers one question about a response (grounded? relevant?
safe?) with yes or no, a score and a rationale, behind one interface (`Judge`), so a
deployment routes a judge to a bigger model without code changes."""
