"""Texts of the Learn page: one entry per family (written for this project; the methods come from the registry)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FamilyText:
    """How a family works, what it is good at, how it tends to fail, and whether it localises defects."""

    how: str
    strengths: list[str]
    failures: list[str]
    localisation: str


INTRO = (
    "All methods here learn what *normal* looks like from defect-free pictures (a few weakly supervised ones also "
    "get a handful of labelled defects) and then give every test image an **anomaly score**: the higher, the "
    "stranger. Most also draw an **anomaly map** that shows where the problem is. They differ in how they describe "
    "normality. The families below follow the grouping of the *Deep Industrial Image Anomaly Detection* survey."
)

FAMILY_TEXT: dict[str, FamilyText] = {
    "teacher_student": FamilyText(
        how=("A network pretrained on millions of everyday photos acts as a fixed *teacher*. A second network, the "
             "*student*, is trained to copy the teacher's feature maps, but only ever sees good parts. On a normal "
             "region the two agree; on a defect the student has never seen anything similar, so its copy drifts "
             "away from the teacher. The size of that disagreement, position by position, is the anomaly map. "
             "*Uninformed Students* trains several students from different random starts and also reads how much "
             "they disagree with each other: on normal content they agree, on unfamiliar content their guesses "
             "scatter, and that spread is added to the error, at several receptive-field sizes. *EfficientAD* "
             "uses a small, fast teacher (distilled from a large pretrained network), punishes the student for "
             "copying the teacher on unrelated pictures, and adds an autoencoder that must predict the teacher's "
             "view of the whole image, which catches logical anomalies such as a missing or misplaced part."),
        strengths=["Pixel-level maps come for free from the feature comparison.",
                   "Fast at test time: two forward passes.",
                   "Strong on small surface defects thanks to the pretrained teacher."],
        failures=["The student may generalise too well and copy the teacher on defects too (missed anomalies).",
                  "Needs gradient training, so results depend on epochs and seed.",
                  "Large logical defects (a missing part) can look locally normal."],
        localisation="Yes: the per-position feature difference is a map.",
    ),
    "one_class": FamilyText(
        how=("The network learns to squeeze the features of every good image (or patch) into a small region, "
             "often pictured as a sphere around a centre point. At test time, the farther a sample lands from that "
             "compact region, the more anomalous it is. Some variants manufacture fake defects during training to "
             "sharpen the boundary."),
        strengths=["A simple, interpretable score: distance to normal.",
                   "Works on patches, so it can point at the defect."],
        failures=["Collapse: the network can map everything, defects included, to the centre.",
                  "Sensitive to defective images slipping into the training set.",
                  "Boundary quality depends heavily on how fake anomalies are made, when used."],
        localisation="When trained on patches or with a fully convolutional head, yes; whole-image versions, no.",
    ),
    "distribution": FamilyText(
        how=("Features from a pretrained network are pushed through a *normalizing flow*: an invertible network "
             "trained so that good features end up looking like samples from a plain Gaussian. Because the mapping "
             "is invertible, the flow gives an exact likelihood for every feature vector. Features that land in "
             "the thin tails of the Gaussian are unlikely under normality, hence anomalous. *CS-Flow* feeds the "
             "image at three sizes and runs one flow over the three feature maps together, so the likelihood at "
             "each scale is computed with the other scales in view."),
        strengths=["A principled probability for every location.",
                   "Among the most accurate families on industrial benchmarks.",
                   "Maps at several scales can be combined."],
        failures=["Training flows can be unstable (exploding log-likelihoods).",
                  "The quality hinges on the chosen feature extractor and flow design.",
                  "Likelihood can be fooled by very smooth or very textured regions."],
        localisation="Yes: a likelihood per feature position.",
    ),
    "memory_bank": FamilyText(
        how=("No network is trained at all. Patch features of every good training image are taken from a "
             "pretrained backbone and stored (a *memory bank*), possibly thinned out to a representative subset or "
             "summarised as one Gaussian per position. A test patch is compared with the bank: if even its nearest "
             "normal neighbour is far away, that patch is anomalous. The image score is the worst patch. *CFA* "
             "adds a small trained layer that pulls every normal patch tightly onto its nearest bank entries (and "
             "away from the next ones), so defects stand out more; *GCPF* summarises all normal patches of a "
             "layer as a handful of Gaussian clusters and scores a patch by its Mahalanobis distance to the "
             "nearest cluster."),
        strengths=["Nothing to train: fitting is one pass of feature extraction.",
                   "Very strong accuracy with few training images.",
                   "Deterministic and easy to reason about."],
        failures=["Memory and search time grow with the number of stored patches.",
                  "Relies entirely on the pretrained features: defects those features cannot see are missed.",
                  "Global or logical anomalies made of normal-looking patches slip through."],
        localisation="Yes: each patch gets its own distance.",
    ),
    "autoencoder": FamilyText(
        how=("An autoencoder is trained to compress a good image through a narrow bottleneck and rebuild it. "
             "Since it has only practised on normal content, it should fail to rebuild a defect and instead paint "
             "something normal in its place. The difference between the input and the rebuild is the anomaly map. "
             "A variational autoencoder adds a probabilistic bottleneck. *DRAEM* trains on synthetic defects "
             "pasted onto good images: one network learns to repair them, a second one compares the image with "
             "its repair and learns to outline the defect directly, so its map is a segmentation. Others fight "
             "the habit of rebuilding defects too well: a *memory module* "
             "(MemAE) only lets the decoder use a sparse mix of stored normal patterns; *skip connections* keep "
             "the rebuild sharp while training on images soiled with synthetic stains teaches the network to "
             "paint them over rather than copy them; and *feature-level reconstruction* (DFR) rebuilds a "
             "pretrained network's feature maps at several scales instead of the pixels."),
        strengths=["Maps at the pixel level, directly comparable with the image.",
                   "Needs no pretrained network (except DFR, which gains the pretrained features' eye for small "
                   "defects).",
                   "Intuitive: you can look at the reconstruction."],
        failures=["Generalises too well: defects get rebuilt faithfully and vanish from the map.",
                  "Blurry rebuilds flag sharp edges and fine texture as anomalies.",
                  "Trained from scratch, so image-level accuracy usually trails feature-based methods.",
                  "A memory too small or too sparse rebuilds even normal variety poorly (false alarms); synthetic "
                  "stains that look unlike real defects teach the wrong repairs."],
        localisation="Yes: reconstruction error per pixel.",
    ),
    "gan": FamilyText(
        how=("A generator learns to produce (or rebuild) good images while a discriminator tries to tell real from "
             "generated. After training, the generator's space only covers normal appearance. A test image that the "
             "generator cannot reproduce well, or whose encoding does not match the re-encoding of its "
             "reconstruction, is scored as anomalous."),
        strengths=["Can model complex, varied appearance.",
                   "Latent-space scores can catch global anomalies."],
        failures=["Hard to train: generator and discriminator must stay balanced.",
                  "Mode collapse: only part of normal variety is learnt, the rest looks anomalous.",
                  "Scores can be noisy from run to run."],
        localisation="Sometimes, through the reconstruction error; latent-only scores give no map.",
    ),
    "transformer": FamilyText(
        how=("The image is cut into patches that are treated like words in a sentence. Self-attention lets every "
             "patch look at every other one, so the model learns how parts of a normal image relate to each other. "
             "Patches that cannot be predicted or rebuilt from their context are anomalous. *UniAD* rebuilds a "
             "pretrained network's patch features; each patch's own neighbourhood is hidden from the attention "
             "and noise is added to the features while training, so the model cannot simply copy its input, "
             "defects included."),
        strengths=["Sees long-range context, useful for logical and structural defects.",
                   "Pretrained vision transformers give strong features."],
        failures=["Data hungry and slow to train from scratch.",
                  "Coarse patch grid limits how fine the map is.",
                  "Attention can also learn to copy defects from the input."],
        localisation="Yes, at patch resolution.",
    ),
    "weakly_supervised": FamilyText(
        how=("Besides many good images, the model also gets a handful of labelled defective ones. It is trained so "
             "that normal scores stay near a reference value while the few known defects are pushed far beyond it. "
             "In this lab you choose K: that many defective test images of each type move into training and are "
             "left out of the evaluation. The systems differ in how they use those few defects: a deviation network "
             "(DevNet) pushes their scores past a margin; mixed supervision also learns from their outlines; the "
             "neural batch sampler watches how an autoencoder's error on each patch evolves during training (it "
             "keeps falling on normal patches) while a learned sampler picks the training batches that make "
             "defects stand out; CAVGA trains a classifier whose attention must cover the whole of a good image "
             "and none of it for the defect class; LIAC weighs the few defects as much as the many good images "
             "and first measures how far each region is from typical good regions."),
        strengths=["A few real defects sharpen the decision a lot.",
                   "Directly optimises the score used for ranking."],
        failures=["Can overfit to the defect types it was shown and miss new kinds.",
                  "Results depend on which K examples were picked.",
                  "Needs labels, which the other families do without.",
                  "Compare with the best unsupervised method of the same run: on some lines the labels help, on "
                  "others a method that ignores them does as well."],
        localisation="Depends on the method: score-only deviation networks give no map.",
    ),
}


def family_text(family: str) -> FamilyText:
    """The text of `family`, or a short placeholder for a family added after this page was written."""
    return FAMILY_TEXT.get(family, FamilyText(how="No description yet.", strengths=[], failures=[],
                                              localisation="See the methods below."))
