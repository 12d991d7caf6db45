"""Hand-written facts about Jane Austen's six novels, the ground truth of the synthetic chat corpus
(scripts/make_chat_corpus.py). Written for this project from the novels themselves; every number below was
checked against the training text (e.g. "ten thousand a year", "on the wrong side of five and thirty",
"Anne, at seven-and-twenty", "a girl of seventeen", "A family of ten children", "twelve thousand a year").

People are keyed by a short id; `name` is how an answer names them, `alias` how a question may.
Families list sibling groups with their parents; relations not implied by a family are listed explicitly."""

NOVELS = {
    "sensesensibility": {"title": "Sense and Sensibility", "year": 1811, "heroine": "elinor"},
    "prideprejudice": {"title": "Pride and Prejudice", "year": 1813, "heroine": "elizabeth"},
    "mansfieldpark": {"title": "Mansfield Park", "year": 1814, "heroine": "fanny"},
    "emma": {"title": "Emma", "year": 1815, "heroine": "emma"},
    "northangerabbey": {"title": "Northanger Abbey", "year": 1817, "heroine": "catherine"},
    "persuasion": {"title": "Persuasion", "year": 1817, "heroine": "anne"},
}

# id: (novel, full name, short name, gender)
PEOPLE = {
    # Pride and Prejudice
    "mrbennet": ("prideprejudice", "Mr. Bennet", "Mr. Bennet", "m"),
    "mrsbennet": ("prideprejudice", "Mrs. Bennet", "Mrs. Bennet", "f"),
    "jane": ("prideprejudice", "Jane Bennet", "Jane", "f"),
    "elizabeth": ("prideprejudice", "Elizabeth Bennet", "Elizabeth", "f"),
    "mary": ("prideprejudice", "Mary Bennet", "Mary", "f"),
    "kitty": ("prideprejudice", "Kitty Bennet", "Kitty", "f"),
    "lydia": ("prideprejudice", "Lydia Bennet", "Lydia", "f"),
    "darcy": ("prideprejudice", "Mr. Darcy", "Darcy", "m"),
    "georgiana": ("prideprejudice", "Georgiana Darcy", "Georgiana", "f"),
    "bingley": ("prideprejudice", "Mr. Bingley", "Bingley", "m"),
    "caroline": ("prideprejudice", "Caroline Bingley", "Miss Bingley", "f"),
    "louisa_hurst": ("prideprejudice", "Mrs. Hurst", "Mrs. Hurst", "f"),
    "collins": ("prideprejudice", "Mr. Collins", "Mr. Collins", "m"),
    "charlotte": ("prideprejudice", "Charlotte Lucas", "Charlotte", "f"),
    "sirwilliam": ("prideprejudice", "Sir William Lucas", "Sir William", "m"),
    "ladycatherine": ("prideprejudice", "Lady Catherine de Bourgh", "Lady Catherine", "f"),
    "annedebourgh": ("prideprejudice", "Anne de Bourgh", "Miss de Bourgh", "f"),
    "wickham": ("prideprejudice", "Mr. Wickham", "Wickham", "m"),
    "mrgardiner": ("prideprejudice", "Mr. Gardiner", "Mr. Gardiner", "m"),
    "colfitzwilliam": ("prideprejudice", "Colonel Fitzwilliam", "Colonel Fitzwilliam", "m"),
    # Sense and Sensibility
    "mrsdashwood": ("sensesensibility", "Mrs. Dashwood", "Mrs. Dashwood", "f"),
    "elinor": ("sensesensibility", "Elinor Dashwood", "Elinor", "f"),
    "marianne": ("sensesensibility", "Marianne Dashwood", "Marianne", "f"),
    "margaret": ("sensesensibility", "Margaret Dashwood", "Margaret", "f"),
    "johndashwood": ("sensesensibility", "John Dashwood", "John Dashwood", "m"),
    "fanny_dashwood": ("sensesensibility", "Fanny Dashwood", "Fanny Dashwood", "f"),
    "edward": ("sensesensibility", "Edward Ferrars", "Edward", "m"),
    "robert": ("sensesensibility", "Robert Ferrars", "Robert Ferrars", "m"),
    "mrsferrars": ("sensesensibility", "Mrs. Ferrars", "Mrs. Ferrars", "f"),
    "brandon": ("sensesensibility", "Colonel Brandon", "Colonel Brandon", "m"),
    "willoughby": ("sensesensibility", "John Willoughby", "Willoughby", "m"),
    "sirjohn": ("sensesensibility", "Sir John Middleton", "Sir John", "m"),
    "ladymiddleton": ("sensesensibility", "Lady Middleton", "Lady Middleton", "f"),
    "mrsjennings": ("sensesensibility", "Mrs. Jennings", "Mrs. Jennings", "f"),
    "charlottepalmer": ("sensesensibility", "Charlotte Palmer", "Mrs. Palmer", "f"),
    "lucy": ("sensesensibility", "Lucy Steele", "Lucy", "f"),
    "annesteele": ("sensesensibility", "Anne Steele", "Miss Steele", "f"),
    # Emma
    "emma": ("emma", "Emma Woodhouse", "Emma", "f"),
    "mrwoodhouse": ("emma", "Mr. Woodhouse", "Mr. Woodhouse", "m"),
    "isabella": ("emma", "Isabella Knightley", "Isabella", "f"),
    "knightley": ("emma", "Mr. Knightley", "Mr. Knightley", "m"),
    "johnknightley": ("emma", "John Knightley", "John Knightley", "m"),
    "mrsweston": ("emma", "Mrs. Weston", "Mrs. Weston", "f"),
    "mrweston": ("emma", "Mr. Weston", "Mr. Weston", "m"),
    "frank": ("emma", "Frank Churchill", "Frank Churchill", "m"),
    "janefairfax": ("emma", "Jane Fairfax", "Jane Fairfax", "f"),
    "missbates": ("emma", "Miss Bates", "Miss Bates", "f"),
    "harriet": ("emma", "Harriet Smith", "Harriet", "f"),
    "robertmartin": ("emma", "Robert Martin", "Robert Martin", "m"),
    "elton": ("emma", "Mr. Elton", "Mr. Elton", "m"),
    "mrselton": ("emma", "Mrs. Elton", "Mrs. Elton", "f"),
    # Mansfield Park
    "fanny": ("mansfieldpark", "Fanny Price", "Fanny", "f"),
    "sirthomas": ("mansfieldpark", "Sir Thomas Bertram", "Sir Thomas", "m"),
    "ladybertram": ("mansfieldpark", "Lady Bertram", "Lady Bertram", "f"),
    "mrsnorris": ("mansfieldpark", "Mrs. Norris", "Mrs. Norris", "f"),
    "mrsprice": ("mansfieldpark", "Mrs. Price", "Mrs. Price", "f"),
    "tom": ("mansfieldpark", "Tom Bertram", "Tom", "m"),
    "edmund": ("mansfieldpark", "Edmund Bertram", "Edmund", "m"),
    "maria": ("mansfieldpark", "Maria Bertram", "Maria", "f"),
    "julia": ("mansfieldpark", "Julia Bertram", "Julia", "f"),
    "william": ("mansfieldpark", "William Price", "William", "m"),
    "susan": ("mansfieldpark", "Susan Price", "Susan", "f"),
    "henry": ("mansfieldpark", "Henry Crawford", "Henry Crawford", "m"),
    "marycrawford": ("mansfieldpark", "Mary Crawford", "Mary Crawford", "f"),
    "mrsgrant": ("mansfieldpark", "Mrs. Grant", "Mrs. Grant", "f"),
    "rushworth": ("mansfieldpark", "Mr. Rushworth", "Mr. Rushworth", "m"),
    "yates": ("mansfieldpark", "Mr. Yates", "Mr. Yates", "m"),
    # Northanger Abbey
    "catherine": ("northangerabbey", "Catherine Morland", "Catherine", "f"),
    "james": ("northangerabbey", "James Morland", "James Morland", "m"),
    "mrsallen": ("northangerabbey", "Mrs. Allen", "Mrs. Allen", "f"),
    "mrallen": ("northangerabbey", "Mr. Allen", "Mr. Allen", "m"),
    "henrytilney": ("northangerabbey", "Henry Tilney", "Henry Tilney", "m"),
    "eleanor": ("northangerabbey", "Eleanor Tilney", "Eleanor", "f"),
    "frederick": ("northangerabbey", "Captain Tilney", "Captain Tilney", "m"),
    "general": ("northangerabbey", "General Tilney", "General Tilney", "m"),
    "isabellathorpe": ("northangerabbey", "Isabella Thorpe", "Isabella Thorpe", "f"),
    "johnthorpe": ("northangerabbey", "John Thorpe", "John Thorpe", "m"),
    "mrsthorpe": ("northangerabbey", "Mrs. Thorpe", "Mrs. Thorpe", "f"),
    # Persuasion
    "anne": ("persuasion", "Anne Elliot", "Anne", "f"),
    "sirwalter": ("persuasion", "Sir Walter Elliot", "Sir Walter", "m"),
    "elizabethelliot": ("persuasion", "Elizabeth Elliot", "Elizabeth Elliot", "f"),
    "marymusgrove": ("persuasion", "Mary Musgrove", "Mary Musgrove", "f"),
    "charlesmusgrove": ("persuasion", "Charles Musgrove", "Charles Musgrove", "m"),
    "louisa": ("persuasion", "Louisa Musgrove", "Louisa", "f"),
    "henrietta": ("persuasion", "Henrietta Musgrove", "Henrietta", "f"),
    "wentworth": ("persuasion", "Captain Wentworth", "Captain Wentworth", "m"),
    "mrscroft": ("persuasion", "Mrs. Croft", "Mrs. Croft", "f"),
    "admiralcroft": ("persuasion", "Admiral Croft", "Admiral Croft", "m"),
    "ladyrussell": ("persuasion", "Lady Russell", "Lady Russell", "f"),
    "benwick": ("persuasion", "Captain Benwick", "Captain Benwick", "m"),
    "williamelliot": ("persuasion", "Mr. William Elliot", "Mr. Elliot", "m"),
    "harville": ("persuasion", "Captain Harville", "Captain Harville", "m"),
    "charleshayter": ("persuasion", "Charles Hayter", "Charles Hayter", "m"),
    "mrsclay": ("persuasion", "Mrs. Clay", "Mrs. Clay", "f"),
    "mrssmith": ("persuasion", "Mrs. Smith", "Mrs. Smith", "f"),
}

# (children in birth order as far as the novel says, father, mother, surname, complete): `complete` is False where
# the novel has more children than are named here (then answers say "one of her sisters", and no count is asked).
FAMILIES = [
    (["jane", "elizabeth", "mary", "kitty", "lydia"], "mrbennet", "mrsbennet", "Bennet", True),
    (["darcy", "georgiana"], None, None, "Darcy", True),
    (["bingley", "caroline", "louisa_hurst"], None, None, "Bingley", True),
    (["charlotte"], "sirwilliam", None, "Lucas", False),
    (["annedebourgh"], None, "ladycatherine", "de Bourgh", True),
    (["elinor", "marianne", "margaret"], None, "mrsdashwood", "Dashwood", True),
    (["edward", "robert", "fanny_dashwood"], None, "mrsferrars", "Ferrars", True),
    (["ladymiddleton", "charlottepalmer"], None, "mrsjennings", "Jennings", True),
    (["annesteele", "lucy"], None, None, "Steele", True),
    (["isabella", "emma"], "mrwoodhouse", None, "Woodhouse", True),
    (["knightley", "johnknightley"], None, None, "Knightley", True),
    (["frank"], "mrweston", None, "Weston", True),
    (["tom", "edmund", "maria", "julia"], "sirthomas", "ladybertram", "Bertram", True),
    (["william", "fanny", "susan"], None, "mrsprice", "Price", False),
    (["mrsnorris", "ladybertram", "mrsprice"], None, None, "Ward", True),
    (["henry", "marycrawford"], None, None, "Crawford", True),
    (["james", "catherine"], None, None, "Morland", False),
    (["frederick", "henrytilney", "eleanor"], "general", None, "Tilney", True),
    (["johnthorpe", "isabellathorpe"], None, "mrsthorpe", "Thorpe", False),
    (["elizabethelliot", "anne", "marymusgrove"], "sirwalter", None, "Elliot", True),
    (["charlesmusgrove", "henrietta", "louisa"], None, None, "Musgrove", False),
    (["wentworth", "mrscroft"], None, None, "Wentworth", False),
]

# Marriages, made or ending the novel: (husband, wife).
MARRIAGES = [
    ("darcy", "elizabeth"), ("bingley", "jane"), ("wickham", "lydia"), ("collins", "charlotte"),
    ("mrbennet", "mrsbennet"), ("edward", "elinor"), ("brandon", "marianne"), ("robert", "lucy"),
    ("johndashwood", "fanny_dashwood"), ("sirjohn", "ladymiddleton"), ("knightley", "emma"),
    ("johnknightley", "isabella"), ("mrweston", "mrsweston"), ("frank", "janefairfax"), ("robertmartin", "harriet"),
    ("elton", "mrselton"), ("edmund", "fanny"), ("sirthomas", "ladybertram"), ("rushworth", "maria"),
    ("yates", "julia"), ("henrytilney", "catherine"), ("mrallen", "mrsallen"), ("wentworth", "anne"),
    ("charlesmusgrove", "marymusgrove"), ("admiralcroft", "mrscroft"), ("benwick", "louisa"),
    ("charleshayter", "henrietta"),
]

# Other relations: (a, relation, b) read "a is b's <relation>".
RELATIONS = [
    ("ladycatherine", "aunt", "darcy"), ("colfitzwilliam", "cousin", "darcy"), ("collins", "cousin", "mrbennet"),
    ("mrgardiner", "uncle", "elizabeth"), ("charlotte", "friend", "elizabeth"), ("johndashwood", "half-brother", "elinor"),
    ("sirjohn", "cousin", "mrsdashwood"), ("missbates", "aunt", "janefairfax"), ("harriet", "friend", "emma"),
    ("mrsweston", "governess", "emma"), ("mrsnorris", "aunt", "fanny"), ("ladybertram", "aunt", "fanny"),
    ("sirthomas", "uncle", "fanny"), ("mrsgrant", "half-sister", "henry"), ("isabellathorpe", "friend", "catherine"),
    ("ladyrussell", "godmother", "anne"), ("williamelliot", "cousin", "anne"), ("mrssmith", "friend", "anne"),
    ("harville", "friend", "wentworth"), ("mrsallen", "neighbour", "catherine"),
]

# Where people live: (people, house, county or town).
HOMES = [
    (["mrbennet", "mrsbennet", "jane", "elizabeth", "mary", "kitty", "lydia"], "Longbourn", "near Meryton in Hertfordshire"),
    (["darcy", "georgiana"], "Pemberley", "in Derbyshire"),
    (["ladycatherine", "annedebourgh"], "Rosings Park", "in Kent"),
    (["collins"], "the parsonage at Hunsford", "near Rosings in Kent"),
    (["mrsdashwood", "elinor", "marianne", "margaret"], "Barton Cottage", "in Devonshire"),
    (["sirjohn", "ladymiddleton"], "Barton Park", "in Devonshire"),
    (["brandon"], "Delaford", "in Dorsetshire"),
    (["johndashwood", "fanny_dashwood"], "Norland Park", "in Sussex"),
    (["emma", "mrwoodhouse"], "Hartfield", "in Highbury"),
    (["knightley"], "Donwell Abbey", "near Highbury"),
    (["mrweston", "mrsweston"], "Randalls", "near Highbury"),
    (["sirthomas", "ladybertram", "tom", "edmund", "maria", "julia"], "Mansfield Park", "in Northamptonshire"),
    (["rushworth"], "Sotherton Court", "in Northamptonshire"),
    (["catherine", "james"], "the parsonage at Fullerton", "in Wiltshire"),
    (["general", "eleanor"], "Northanger Abbey", "in Gloucestershire"),
    (["sirwalter", "elizabethelliot"], "Kellynch Hall", "in Somersetshire"),
    (["charlesmusgrove", "marymusgrove"], "Uppercross Cottage", "in Somersetshire"),
]

# Numbers the text states, for arithmetic questions: (key, question subject, value, unit, source phrase).
NUMBERS = [
    ("bennet_daughters", "daughters of Mr. and Mrs. Bennet", 5, "", "her five daughters"),
    ("dashwood_sisters", "Dashwood sisters", 3, "", "Elinor, Marianne and Margaret"),
    ("bertram_children", "children of Sir Thomas and Lady Bertram", 4, "", "Tom, Edmund, Maria and Julia"),
    ("elliot_daughters", "daughters of Sir Walter Elliot", 3, "", "Elizabeth, Anne and Mary"),
    ("tilney_children", "children of General Tilney", 3, "", "Frederick, Henry and Eleanor"),
    ("morland_children", "children in the Morland family", 10, "", "a family of ten children"),
    ("darcy_income", "Mr. Darcy's income", 10000, "pounds a year", "ten thousand a year"),
    ("rushworth_income", "Mr. Rushworth's income", 12000, "pounds a year", "twelve thousand a year"),
    ("delaford_income", "the income of Delaford", 2000, "pounds a year", "never reckoned more than two thousand a year"),
    ("brandon_age", "Colonel Brandon's age", 35, "years", "on the wrong side of five and thirty"),
    ("elinor_age", "Elinor's age", 19, "years", "though only nineteen"),
    ("anne_age", "Anne Elliot's age", 27, "years", "Anne, at seven-and-twenty"),
    ("harriet_age", "Harriet Smith's age", 17, "years", "a girl of seventeen"),
    ("emma_age", "Emma's age", 21, "years", "nearly twenty-one years in the world"),
    ("taylor_years", "the years Miss Taylor spent with the Woodhouses", 16, "years", "Sixteen years had Miss Taylor been in Mr. Woodhouse's family"),
]

# Words whose presence marks a paragraph as belonging to one novel (for "which novel is this from?").
MARKERS = {
    "prideprejudice": ["Darcy", "Bingley", "Bennet", "Wickham", "Longbourn", "Netherfield", "Pemberley", "Lydia", "Meryton", "Rosings"],
    "sensesensibility": ["Elinor", "Marianne", "Willoughby", "Brandon", "Dashwood", "Ferrars", "Norland", "Jennings", "Middleton"],
    "emma": ["Emma", "Harriet", "Knightley", "Weston", "Woodhouse", "Highbury", "Hartfield", "Elton", "Churchill", "Fairfax"],
    "mansfieldpark": ["Bertram", "Edmund", "Norris", "Crawford", "Mansfield", "Rushworth", "Sotherton", "Sir Thomas"],
    "northangerabbey": ["Tilney", "Thorpe", "Morland", "Northanger", "Allen", "Fullerton"],
    "persuasion": ["Wentworth", "Kellynch", "Musgrove", "Uppercross", "Lady Russell", "Croft", "Benwick", "Sir Walter"],
}
