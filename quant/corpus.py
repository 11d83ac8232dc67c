"""A small mixed-domain text for offline calibration, written for this project (our own words).

It exists so that `quantserve quantize` works with no file and no network: encyclopedic prose,
narrative, chat turns in the ChatML layout instruct models are served with, code in several
languages, arithmetic, instructions, letters, news, verse, structured data, and a little French,
Spanish and German. `PROMPTS` are the openings the model continues for data-free calibration.
"""

from __future__ import annotations

import random

PASSAGES: tuple[str, ...] = (
    # encyclopedic
    """The water cycle describes how water moves between the oceans, the air and the land. Sunlight warms the surface of seas and lakes, and some of that water turns into vapour. Plants add more vapour through tiny pores in their leaves, a process called transpiration. As warm, moist air rises it cools, and the vapour condenses around specks of dust and salt to form clouds. When droplets grow heavy enough they fall as rain, snow or hail. Part of that precipitation runs off into streams and rivers, part soaks into the soil and recharges groundwater, and part is locked away for years in glaciers and ice sheets. Although the total amount of water on Earth barely changes, the time a single molecule spends in each store varies enormously: about nine days in the atmosphere, a few months in a river, and thousands of years in a deep aquifer or in the Antarctic ice.""",
    """Movable type changed how knowledge travelled. Before it, a book was copied by hand, letter by letter, and a single volume could take a scribe many months. Printers in East Asia carved whole pages into wooden blocks, and later experimented with individual characters made of baked clay and then of metal. In the middle of the fifteenth century a goldsmith in Mainz combined several ideas at once: a hand mould that cast identical letters quickly, an alloy of lead, tin and antimony that melted at a low temperature, an oil-based ink that clung to metal, and a screw press adapted from the ones used for wine and paper. Within fifty years presses were running in more than two hundred European towns. Prices fell, spelling began to settle, and scholars in distant cities could finally be sure they were reading the same text.""",
    """Volcanoes form where molten rock, called magma, reaches the surface. Most of them sit along the edges of tectonic plates. Where one plate slides beneath another, water carried down with the sinking slab lowers the melting point of the mantle above it, and chains of steep, explosive volcanoes appear, such as those that ring the Pacific. Where plates pull apart, as along the mid-ocean ridges, magma wells up more gently and builds new sea floor. A third kind, the hotspot volcano, sits far from any boundary; the islands of Hawaii grew as the Pacific plate drifted over a plume of unusually hot mantle. The style of an eruption depends mostly on how much gas and silica the magma holds. Runny basalt lets gas escape and pours out as lava flows, while sticky, silica-rich magma traps gas until it shatters into ash and pumice.""",
    """Photosynthesis is the set of reactions by which plants, algae and some bacteria store the energy of light in chemical bonds. In the first stage, pigments such as chlorophyll absorb red and blue light and use it to split water molecules. This releases oxygen as a by-product and produces two carriers of energy, ATP and NADPH. In the second stage, often called the Calvin cycle, an enzyme named RuBisCO attaches carbon dioxide from the air to a five-carbon sugar. A series of further steps turns the result into a three-carbon sugar that the cell can use to build glucose, starch or cellulose. RuBisCO is probably the most abundant protein on the planet, partly because it is slow: it fixes only a few molecules of carbon dioxide per second, so plants need a great deal of it.""",
    """The Silk Road was never a single road. It was a shifting web of caravan routes, river crossings and sea lanes that linked China with Central Asia, Persia, India, Arabia and the Mediterranean for well over a thousand years. Few merchants travelled its whole length; goods passed from hand to hand through oasis towns such as Samarkand, Kashgar and Merv, gaining value at every stage. Silk moved west, while glassware, silver, horses and wool moved east. Ideas travelled too. Buddhism spread from India into China along these routes, paper-making reached the Islamic world and later Europe, and the same caravans carried astronomical tables, recipes, musical instruments and, less happily, disease.""",
    # narrative
    """Mara had kept the lighthouse for eleven winters, and in all that time the lamp had never failed. So when she climbed the stairs that evening and found the lens dark, she stood very still and listened. The wind was rising from the south-west. Somewhere below, a shutter banged against the stone. She lit the spare lantern, checked the oil, and traced the wire from the lamp down to the little room where the batteries were kept. The door was open. On the floor lay a wet boot print, far too small to be hers, pointing toward the sea. "Hello?" she called, and felt foolish, because the only answer was the roar of the surf on the rocks. She fixed the loose connection in under ten minutes. It was only afterwards, with the beam sweeping the water again, that she noticed the rowing boat tied up where no boat should have been.""",
    """The train was late, as it always was on Thursdays, and Tomas used the time to finish the crossword he had started on Monday. Seven across still defeated him: "A quiet agreement, nine letters." Across the platform a woman in a green coat was arguing with a ticket machine. A pigeon walked along the edge of the track with the confidence of a station master. When the train finally arrived, the doors opened to reveal a carriage so full that nobody moved. Tomas folded his newspaper, stepped back, and decided that for once he would walk. It was three kilometres to the office. Halfway there, crossing the bridge over the canal, he stopped, laughed out loud, and wrote the answer in the margin: acquiesce.""",
    """Grandmother said the orchard was older than the house, and the house was older than anyone could remember. Every September the whole family came back to pick the apples. The children climbed the low branches while the adults worked with ladders and long poles with little cloth bags at the end. Nobody was allowed to throw an apple, though everybody did. In the evenings the kitchen smelled of cinnamon and burnt sugar, and the windows fogged up from the big pot on the stove. Years later, after the orchard had been sold, I found one of those cloth bags in a drawer. It still had a leaf inside it, brown and thin as paper, and for a moment I could hear my cousins shouting from the top of the old tree.""",
    # chat, in the ChatML layout instruct models see
    """<|im_start|>system
You are a helpful assistant.<|im_end|>
<|im_start|>user
What is the difference between weather and climate?<|im_end|>
<|im_start|>assistant
Weather is what the atmosphere is doing over a short period, from minutes to a couple of weeks: today's temperature, whether it rains this afternoon, how strong the wind is tonight. Climate is the long-term pattern of weather in a place, usually averaged over thirty years or more. A useful way to remember it: climate is what you expect, weather is what you get. A single cold winter does not tell you much about the climate, but a steady rise in average temperatures over decades does.<|im_end|>
<|im_start|>user
So can a place with a warm climate still have snow?<|im_end|>
<|im_start|>assistant
Yes. A warm climate only means that snow is rare there, not impossible. Unusual air masses can bring a few days of cold weather to almost anywhere, and high mountains in warm regions can have snow for much of the year.<|im_end|>""",
    """<|im_start|>system
You are a helpful assistant.<|im_end|>
<|im_start|>user
Can you help me write a short, polite email asking my landlord to fix a leaking tap?<|im_end|>
<|im_start|>assistant
Of course. Here is a draft you can adapt:

Subject: Leaking kitchen tap at flat 4B

Dear Mr. Patel,

I hope you are well. I am writing to let you know that the kitchen tap in my flat has been dripping steadily for the past week, even when it is fully closed. I have tried tightening it, but the leak continues, and I am worried it may be wasting water and raising the bill.

Could you please arrange for someone to take a look? I am usually at home after 5 pm on weekdays, and I am happy to agree on another time if that is easier.

Thank you for your help.

Kind regards,
Jordan Lee<|im_end|>
<|im_start|>user
Thanks! Can you make it a bit shorter?<|im_end|>
<|im_start|>assistant
Sure:

Dear Mr. Patel, the kitchen tap in flat 4B has been dripping for a week even when closed. Could you send someone to repair it? I am home most weekdays after 5 pm. Thank you, Jordan Lee<|im_end|>""",
    """<|im_start|>system
You are a helpful assistant.<|im_end|>
<|im_start|>user
Explain recursion to a ten-year-old.<|im_end|>
<|im_start|>assistant
Imagine you are standing at the end of a long line of friends, and you want to know how many people are in the line. Instead of counting everybody yourself, you tap the person in front of you and ask, "How many people are in front of you?" They do the same thing, and so on, until the person at the very front says, "Nobody is in front of me, so the answer is zero." Then the answers travel back: each person adds one and passes it on. That is recursion: solving a big problem by asking a smaller version of the same question, and having a simple rule for when to stop.<|im_end|>
<|im_start|>user
What happens if nobody is at the front?<|im_end|>
<|im_start|>assistant
Then the question would be passed along forever and nobody would ever answer. In programming that is called infinite recursion, and the computer eventually runs out of memory and stops with an error. That is why every recursive function needs a stopping rule, called a base case.<|im_end|>""",
    # code
    '''def moving_average(values, window):
    """Return the averages of each run of `window` consecutive values.

    >>> moving_average([1, 2, 3, 4, 5], 2)
    [1.5, 2.5, 3.5, 4.5]
    """
    if window <= 0:
        raise ValueError(f"window must be positive, got {window}")
    if window > len(values):
        return []
    total = sum(values[:window])
    averages = [total / window]
    for i in range(window, len(values)):
        total += values[i] - values[i - window]
        averages.append(total / window)
    return averages


class LRUCache:
    """A least-recently-used cache built on an ordered dictionary."""

    def __init__(self, capacity: int) -> None:
        from collections import OrderedDict
        self.capacity = capacity
        self.items = OrderedDict()

    def get(self, key, default=None):
        if key not in self.items:
            return default
        self.items.move_to_end(key)
        return self.items[key]

    def put(self, key, value) -> None:
        self.items[key] = value
        self.items.move_to_end(key)
        if len(self.items) > self.capacity:
            self.items.popitem(last=False)
''',
    """// Debounce: call `fn` only after `delay` ms have passed without another call.
function debounce(fn, delay = 300) {
  let timer = null;
  return function (...args) {
    clearTimeout(timer);
    timer = setTimeout(() => fn.apply(this, args), delay);
  };
}

const search = document.querySelector("#search");
const results = document.querySelector("#results");

search.addEventListener("input", debounce(async (event) => {
  const query = event.target.value.trim();
  if (query.length < 2) {
    results.innerHTML = "";
    return;
  }
  const response = await fetch(`/api/search?q=${encodeURIComponent(query)}`);
  if (!response.ok) {
    results.textContent = `Search failed (${response.status})`;
    return;
  }
  const items = await response.json();
  results.innerHTML = items.map((item) => `<li>${item.title}</li>`).join("");
}));""",
    """-- Monthly revenue per region, with the share of the yearly total.
SELECT
    r.name AS region,
    date_trunc('month', o.created_at) AS month,
    SUM(o.amount) AS revenue,
    ROUND(100.0 * SUM(o.amount) / SUM(SUM(o.amount)) OVER (PARTITION BY r.name), 2) AS pct_of_year
FROM orders AS o
JOIN customers AS c ON c.id = o.customer_id
JOIN regions AS r ON r.id = c.region_id
WHERE o.created_at >= DATE '2023-01-01'
  AND o.created_at < DATE '2024-01-01'
  AND o.status = 'paid'
GROUP BY r.name, date_trunc('month', o.created_at)
ORDER BY region, month;

#!/usr/bin/env bash
set -euo pipefail
# Back up every database listed in dbs.txt, keeping the last seven copies.
backup_dir="/var/backups/db"
mkdir -p "$backup_dir"
while read -r db; do
  stamp=$(date +%Y%m%d-%H%M%S)
  pg_dump "$db" | gzip > "$backup_dir/$db-$stamp.sql.gz"
  ls -1t "$backup_dir/$db-"*.sql.gz | tail -n +8 | xargs -r rm --
done < dbs.txt""",
    """#include <stdio.h>
#include <stdlib.h>

/* Binary search in a sorted array; returns the index of key or -1. */
static int find(const int *a, int n, int key) {
    int lo = 0, hi = n - 1;
    while (lo <= hi) {
        int mid = lo + (hi - lo) / 2;
        if (a[mid] == key) return mid;
        if (a[mid] < key) lo = mid + 1;
        else hi = mid - 1;
    }
    return -1;
}

int main(void) {
    int primes[] = {2, 3, 5, 7, 11, 13, 17, 19, 23, 29};
    int n = sizeof primes / sizeof primes[0];
    for (int key = 0; key < 30; key += 7) {
        int at = find(primes, n, key);
        printf("%2d -> %s (index %d)\\n", key, at >= 0 ? "prime" : "not found", at);
    }
    return EXIT_SUCCESS;
}""",
    # arithmetic and reasoning
    """Problem: A shop sells pencils in packs of 12 for $3.60 and single pencils for $0.35 each. How much does it cost to buy 30 pencils as cheaply as possible?

Solution: One pencil in a pack costs 3.60 / 12 = $0.30, which is cheaper than $0.35, so we buy as many packs as we can. Two packs give 24 pencils for 2 x 3.60 = $7.20. We still need 6 pencils. Buying them singly costs 6 x 0.35 = $2.10, while a third pack costs $3.60, so singles are cheaper. The total is 7.20 + 2.10 = $9.30.

Problem: The sum of three consecutive even numbers is 78. What are they?

Solution: Call the middle number n. The three numbers are n - 2, n and n + 2, and their sum is 3n = 78, so n = 26. The numbers are 24, 26 and 28. Check: 24 + 26 + 28 = 78.

Problem: A car travels 150 km at 60 km/h and then 150 km at 100 km/h. What is its average speed?

Solution: The first part takes 150 / 60 = 2.5 hours and the second 150 / 100 = 1.5 hours, so 300 km take 4 hours. The average speed is 300 / 4 = 75 km/h, not the 80 km/h you would get by averaging the two speeds.""",
    """The derivative of a function measures how fast its value changes. For f(x) = x^2 the slope of the secant line between x and x + h is ((x + h)^2 - x^2) / h = 2x + h, and as h shrinks to zero this approaches 2x, so f'(x) = 2x. The same reasoning gives the power rule: the derivative of x^n is n x^(n-1). The chain rule handles compositions: if y = g(u) and u = h(x), then dy/dx = g'(u) h'(x). For example, the derivative of sin(3x^2) is cos(3x^2) times 6x. Integration runs the other way. The fundamental theorem of calculus says that the integral of f' from a to b equals f(b) - f(a), so the area under 2x between 0 and 3 is 3^2 - 0^2 = 9.""",
    # instructions and lists
    """How to repot a houseplant

1. Choose a pot only one size larger than the old one, about 2 to 5 cm wider, with a drainage hole.
2. Water the plant a day before, so the root ball holds together.
3. Turn the old pot on its side, support the base of the stems with one hand, and ease the plant out. If it sticks, run a knife around the inside edge.
4. Loosen circling roots gently with your fingers and trim any that are black or mushy.
5. Put a layer of fresh potting mix in the new pot, set the plant so the top of the root ball sits about 2 cm below the rim, and fill around it.
6. Firm the soil lightly, water until it drains from the bottom, and keep the plant out of strong sun for a week.

Tip: spring is the best time, when the plant is starting to grow again.""",
    """Lentil soup (serves four)

Ingredients: 250 g red lentils, 1 onion, 2 carrots, 2 cloves of garlic, 1 teaspoon ground cumin, half a teaspoon of smoked paprika, 1 litre of vegetable stock, 1 tin of chopped tomatoes, the juice of half a lemon, olive oil, salt and pepper.

Rinse the lentils until the water runs clear. Chop the onion and carrots finely and soften them in two tablespoons of oil over a medium heat for about eight minutes. Add the garlic and spices and stir for one minute. Pour in the lentils, the stock and the tomatoes, bring to the boil, then lower the heat and simmer for 20 to 25 minutes, until the lentils have fallen apart. Blend half of the soup if you like it thicker. Season, stir in the lemon juice, and serve with warm bread.""",
    # letters, news, reports
    """Dear members,

Thank you to everyone who came to the spring meeting of the Riverside Allotment Society. We welcomed fourteen new plot holders this year, which means the waiting list is shorter than it has been since 2015. The committee agreed three changes. First, the water troughs will be switched on from 1 April instead of 15 April. Second, the shared tool shed now has a combination lock; the code will be sent to paid-up members by text message. Third, bonfires are no longer allowed on weekends between May and September, following complaints from neighbours.

The seed swap raised 212 pounds for the new polytunnel. Our next working party is on Saturday 20 April from 10 am; please bring gloves and, if you can, a wheelbarrow.

With best wishes,
Helen Ward, Secretary""",
    """City council approves new cycle lanes

The city council voted on Tuesday to build 14 kilometres of protected cycle lanes over the next two years, after a debate that lasted more than four hours. The plan, which passed by 31 votes to 17, will separate bicycles from traffic with low concrete kerbs on six of the busiest roads into the centre. Supporters said the lanes would make cycling safer and cut congestion, pointing to a trial on Mill Road where bicycle journeys rose by 40 percent in a year. Opponents argued that removing parking spaces would hurt small shops. The council said it would keep loading bays for deliveries and would publish traffic counts every six months. Construction is expected to begin in the autumn, starting with the route from the railway station to the university.""",
    """Quarterly summary: the support team closed 4,812 tickets between July and September, up 9% from the previous quarter. Median first-response time fell from 3 hours 40 minutes to 2 hours 5 minutes after we added an evening shift. Customer satisfaction held steady at 92%. The most common topics were password resets (21%), billing questions (18%) and problems connecting the mobile app to home Wi-Fi (14%). Two issues need attention: refunds still take an average of eight days, and tickets in Portuguese wait almost twice as long as others because only one agent speaks the language. Next quarter we plan to publish a self-service guide for Wi-Fi setup and to hire a second Portuguese speaker.""",
    # verse
    """The kettle hums its morning tune,
the window holds a paler moon,
the cat pretends she cannot hear
the tin of breakfast drawing near.

Outside, the street is rinsed with rain,
a bus sighs past and sighs again,
and somewhere, under all the grey,
a blackbird rehearses the day.""",
    # structured data and documentation
    """{
  "name": "weather-station",
  "version": "2.3.1",
  "sensors": [
    {"id": "t1", "type": "temperature", "unit": "celsius", "interval_s": 60},
    {"id": "h1", "type": "humidity", "unit": "percent", "interval_s": 60},
    {"id": "w1", "type": "wind_speed", "unit": "m/s", "interval_s": 10}
  ],
  "upload": {"url": "https://example.org/api/readings", "batch_size": 50, "retry": 3},
  "location": {"lat": 52.2053, "lon": 0.1218, "elevation_m": 12}
}

## Configuration

| key | default | meaning |
|---|---|---|
| `interval_s` | 60 | seconds between two readings of a sensor |
| `batch_size` | 50 | readings sent in one upload |
| `retry` | 3 | attempts before a batch is written to local storage |

Readings that cannot be uploaded are kept on the SD card and sent the next time the network is available. Times are stored in UTC.""",
    """Date,Station,Max temp (C),Min temp (C),Rain (mm),Sunshine (h)
2023-06-01,North Point,21.4,11.2,0.0,12.5
2023-06-02,North Point,19.8,12.6,3.2,6.1
2023-06-03,North Point,17.5,10.9,11.8,1.4
2023-06-04,North Point,18.9,9.7,0.4,9.8
2023-06-05,North Point,22.6,10.3,0.0,13.2

In the first five days of June the warmest afternoon reached 22.6 degrees and the coolest night fell to 9.7 degrees. Almost all of the week's 15.4 mm of rain fell on the 2nd and 3rd, when a slow-moving front crossed the region.""",
    # other languages
    """Le marché du samedi ouvre à sept heures. Les maraîchers installent leurs étals sous les platanes de la place, et l'odeur du pain chaud se mêle à celle des fraises. On y trouve des fromages de la vallée, du miel de lavande, des œufs encore tièdes et, en automne, des champignons ramassés la veille dans la forêt. Vers midi, les cafés se remplissent et les conversations portent sur la météo, les prix et le match de dimanche.""",
    """La biblioteca del barrio abrió en 1962 en una antigua fábrica de sombreros. Hoy presta más de treinta mil libros al año y organiza talleres de lectura para niños, clases de informática para mayores y un club de ajedrez que se reúne los jueves por la tarde. Los vecinos la llaman simplemente «la fábrica», y muchos recuerdan haber hecho allí los deberes cuando eran pequeños.""",
    """Der Zug nach Hamburg fährt heute mit etwa zwanzig Minuten Verspätung ab Gleis 7. Grund dafür ist eine Weichenstörung kurz hinter dem Bahnhof. Reisende mit Anschluss in Hannover werden gebeten, sich an das Zugpersonal zu wenden. Wir bitten um Entschuldigung und danken für Ihr Verständnis.""",
    # explanatory
    """Why does bread go stale? Surprisingly, not mainly because it dries out. Fresh bread is soft because the starch in the flour absorbed water and lost its ordered, crystalline structure during baking. As the loaf cools and sits, the starch molecules slowly line up again and squeeze water out of their structure, a process called retrogradation. The crumb becomes firm and crumbly even if no water has left the loaf. This is why bread stales fastest in the refrigerator, where the cool temperature speeds up retrogradation, and why briefly reheating a stale roll makes it soft again: the heat undoes the crystallisation, at least for a while. Freezing, on the other hand, almost stops the process, so a loaf frozen on the day it was baked tastes nearly fresh when thawed.""",
    """A hash table stores key and value pairs so that looking up a key takes, on average, the same short time no matter how many entries there are. It keeps an array of buckets and uses a hash function to turn each key into a bucket number. Two different keys can land in the same bucket, which is called a collision. One common fix, chaining, keeps a small list in every bucket; another, open addressing, looks for the next free slot according to a fixed rule. As the table fills, collisions become more frequent, so most implementations grow the array, typically doubling it, once the ratio of entries to buckets passes a threshold such as 0.75, and then move every entry to its new bucket.""",
    """Good sleep depends more on regularity than on any single trick. Going to bed and getting up at roughly the same times, even at weekends, keeps the body's internal clock steady. Daylight in the morning helps set that clock, while bright screens late in the evening push it later. Caffeine lingers for many hours, so a cup of coffee at four in the afternoon can still affect sleep at midnight. Alcohol may help people fall asleep, but it fragments sleep in the second half of the night. A cool, dark and quiet room helps, and if you cannot sleep after about twenty minutes, it is usually better to get up and do something calm in dim light than to lie awake watching the clock.""",
)

PROMPTS: tuple[str, ...] = (
    "The history of the city begins",
    "In physics, energy is",
    "Once upon a time, in a small village by the sea,",
    "<|im_start|>user\nHow do I make my tomato plants grow better?<|im_end|>\n<|im_start|>assistant\n",
    "def main():\n    ",
    "The committee met on Monday to discuss",
    "Here are five tips for learning a new language:\n1.",
    "The results of the experiment show that",
    "<|im_start|>user\nWrite a short story about a robot who learns to paint.<|im_end|>\n"
    "<|im_start|>assistant\n",
    "During the nineteenth century, the railway",
    "To solve the equation 3x + 7 = 22,",
    "Dear Sarah,\n\nThank you for your letter.",
    "The album was released in",
    "import numpy as np\n\n",
    "The river flows through",
    "<|im_start|>user\nWhat are the main causes of inflation?<|im_end|>\n<|im_start|>assistant\n",
)


def text(seed: int = 0) -> str:
    """All passages in a seeded order, joined by blank lines."""
    order = list(PASSAGES)
    random.Random(seed).shuffle(order)
    return "\n\n".join(order)
