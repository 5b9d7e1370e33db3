"""The built-in diagnosis prompt set: short multi-domain texts written for this project.

Sixteen prompts: English prose (narrative, science, news-style, instructions), code (Python, C, SQL, shell),
French, Spanish, German, Portuguese, Chinese, Arabic, Hindi, and arithmetic. BLOOM was trained on these languages
and on code, so each prompt exercises heads the way ordinary input does. Lengths are 30-90 words, so that later
query rows see many keys and first-token collapse is visible. Used when no ``--prompt``/``--prompts-file`` is given.
"""

DEFAULT_PROMPTS = (
    # English narrative
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. He wound the clockwork, trimmed the "
    "wick and wrote the weather in a leather book. In forty years he had missed only one night, the winter the "
    "ice closed the harbour and the supply boat never came.",
    # English science
    "Photosynthesis converts light energy into chemical energy. In the chloroplast, water is split, oxygen is "
    "released, and the energy carried by ATP and NADPH is used by the Calvin cycle to fix carbon dioxide into "
    "three-carbon sugars that the plant later assembles into glucose and starch.",
    # English news style
    "City officials announced on Tuesday that the old railway bridge will close for repairs next month. Engineers "
    "found corrosion in two of the steel supports during a routine inspection. Commuters are advised to use the "
    "ferry or the northern bypass until the work is finished in the spring.",
    # English instructions
    "To repot a houseplant, water it a day before, then tip the pot and ease the root ball out. Loosen circling "
    "roots with your fingers, set the plant in a pot one size larger on a layer of fresh compost, fill the sides, "
    "press gently and water until it drains from the bottom.",
    # Python
    "def merge_sorted(a, b):\n    \"\"\"Merge two sorted lists into one sorted list.\"\"\"\n    out, i, j = [], 0, 0\n"
    "    while i < len(a) and j < len(b):\n        if a[i] <= b[j]:\n            out.append(a[i]); i += 1\n"
    "        else:\n            out.append(b[j]); j += 1\n    return out + a[i:] + b[j:]\n",
    # C
    "#include <stdio.h>\n\nstatic unsigned long fib(unsigned n) {\n    unsigned long a = 0, b = 1;\n"
    "    while (n--) { unsigned long t = a + b; a = b; b = t; }\n    return a;\n}\n\nint main(void) {\n"
    "    for (unsigned i = 0; i < 10; i++) printf(\"%u: %lu\\n\", i, fib(i));\n    return 0;\n}\n",
    # SQL
    "SELECT c.name, COUNT(o.id) AS orders, SUM(o.total) AS revenue\nFROM customers AS c\n"
    "JOIN orders AS o ON o.customer_id = c.id\nWHERE o.created_at >= DATE '2024-01-01'\nGROUP BY c.name\n"
    "HAVING COUNT(o.id) > 3\nORDER BY revenue DESC\nLIMIT 20;",
    # shell
    "#!/usr/bin/env bash\nset -euo pipefail\nfor f in logs/*.log; do\n  lines=$(wc -l < \"$f\")\n"
    "  if [ \"$lines\" -gt 1000 ]; then\n    gzip -k \"$f\" && echo \"compressed $f ($lines lines)\"\n  fi\ndone\n",
    # French
    "Le marché du samedi s'installe sur la place dès six heures du matin. Les maraîchers déchargent leurs "
    "cagettes de tomates et de courgettes, le fromager découpe de larges parts de comté, et l'odeur du pain chaud "
    "attire déjà les premiers clients qui discutent de la pluie annoncée pour l'après-midi.",
    # Spanish
    "La biblioteca del pueblo abrió sus puertas hace más de un siglo gracias a la donación de un maestro "
    "jubilado. Hoy conserva mapas antiguos, cartas de emigrantes y una colección de novelas que los vecinos "
    "siguen leyendo en voz alta durante las largas tardes de invierno.",
    # German
    "Der Zug nach Hamburg hatte wegen eines Signalfehlers zwanzig Minuten Verspätung. Die Reisenden im "
    "Großraumwagen nahmen es gelassen: Einige lasen Zeitung, andere tranken Kaffee aus Pappbechern, und ein "
    "Kind zählte laut die Windräder, die langsam an den Fenstern vorbeizogen.",
    # Portuguese
    "O pescador saiu antes do amanhecer, quando o mar ainda estava escuro e calmo. Levava redes remendadas, pão, "
    "café num termo e a esperança de voltar cedo, porque a previsão falava de vento forte e ondas altas para o "
    "fim da tarde.",
    # Chinese
    "春天来了，山坡上的桃花一片一片地开放。农民们在田里忙着播种，孩子们放学后在河边放风筝。"
    "傍晚时分，炊烟从村子里升起，空气中飘着饭菜的香味，老人们坐在门口聊着今年的收成。",
    # Arabic
    "في صباح يوم الجمعة يمتلئ السوق القديم بالناس. يعرض التجار التوابل والأقمشة الملونة والفواكه الطازجة، "
    "ويتبادل الجيران الأخبار أمام المقهى الصغير بينما تفوح رائحة الخبز الساخن من الفرن القريب.",
    # Hindi
    "गाँव के किनारे एक पुराना बरगद का पेड़ है। गर्मियों की दोपहर में किसान उसकी छाँव में आराम करते हैं, "
    "बच्चे उसकी जड़ों पर खेलते हैं और शाम को बुज़ुर्ग वहीं बैठकर दिन भर की बातें करते हैं।",
    # arithmetic
    "Compute step by step: 17 * 24 = 408. 408 + 193 = 601. 601 - 256 = 345. 345 / 5 = 69. "
    "Check: 69 * 5 = 345, 345 + 256 = 601, 601 - 193 = 408, and 408 / 24 = 17. All steps agree.",
)


def read_prompts(prompts=None, prompts_file=None, *, blank_lines: str = "skip", field: str = "text"
                 ) -> list[str] | None:
    """``prompts`` (strings) plus the texts of ``prompts_file``; None when both are empty. The file is read by
    :func:`~alibi_surgery.io.texts.read_texts`: a ``.jsonl`` file (one ``{field: ...}`` object per line) or a
    ``.json`` list (of strings, or of objects with ``field``) gives whole texts, newlines and blank lines inside
    them kept; any other file is one prompt per line, split on ``\\n`` and ``\\r\\n`` only (a form feed or U+2028
    inside a line stays in that prompt), UTF-8 with a byte-order mark dropped. Empty prompts, a missing, unreadable,
    non-UTF-8 or empty file, a directory, malformed JSON and a missing field are one-line errors (naming
    ``FILE:LINE`` where there is one); so is a blank line of a plain file with ``blank_lines="error"`` (where each
    line is one text to score), which ``"skip"`` (the default) drops."""
    from ..errors import UsageError
    from ..io.texts import read_texts

    out = list(prompts or [])
    if prompts_file:
        out += read_texts(prompts_file, field=field, what="prompts file", blank_lines=blank_lines)
    for i, text in enumerate(out):
        if not text.strip():
            raise UsageError(f"prompt {i} is empty")
    return out or None
