"""The task world's characters: shared by its generator (``taskworld``) and its language (``language``)."""

LETTERS = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"
# Every character that can appear in a prompt or an answer; the tokenizer is built from this.
ALPHABET = LETTERS + DIGITS + " =+:\n"
END = "\n"
# The BOS token as text: the character tokenizer maps it to its BOS id (a special token).
BOS = "<s>"
LANG = "lang"
