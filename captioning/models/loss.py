"""The caption loss: masked sparse cross-entropy, every predicted word weighing the same.

Owns CaptionLoss, registered with Keras as "caption_train>CaptionLoss": every compiled
model.keras stores that name, so renaming the class or LOSS_PACKAGE would stop saved models
from loading with compile=True (tests/test_models.py pins it). Subclasses a Keras class, so
Keras is imported at the top: registry.py imports this module inside compile_model/load_keras.
"""
import keras
from keras import ops

LOSS_PACKAGE = "caption_train"   # the registered name saved inside every model.keras: keep it


@keras.saving.register_keras_serializable(package=LOSS_PACKAGE)
class CaptionLoss(keras.losses.Loss):
    """Masked sparse cross-entropy on probabilities y_pred (B, T, V) or (B, V), targets (B, T) or (B,).

    Targets equal to 0 (padding) are masked. label_smoothing eps: (1-eps)*NLL + eps*mean_v(-log p_v).
    A batch's loss is its summed word losses divided by rows * words_per_row, where
    words_per_row is a constant of the training set (mean target words per caption; 1 in pairs
    mode). Why not the batch's own word count: length bucketing makes some batches all short
    captions, and a per-batch mean would give each word of a short batch several times the
    weight of a word in a long batch - on Flickr8k that is a pull towards ending captions
    early. With the constant, the epoch's gradient weighs all words alike, and the loss Keras
    reports (batch losses averaged by rows) is exactly the mean per predicted word, in nats.
    Without words_per_row (models saved before it existed) the batch's word count is used.
    """

    def __init__(self, label_smoothing=0.0, words_per_row=None, name="caption_loss",
                 reduction="sum", **kwargs):
        super().__init__(name=name, reduction="sum", **kwargs)
        self.label_smoothing = float(label_smoothing)
        self.words_per_row = float(words_per_row) if words_per_row else None

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, "int32")
        # Keras' own sparse CE reuses the softmax's logits (fused, stable) when it can
        loss = keras.losses.sparse_categorical_crossentropy(y_true, y_pred)
        if self.label_smoothing:
            mean_log_p = ops.mean(ops.log(ops.clip(y_pred, 1e-7, 1.0)), axis=-1)
            loss = (1 - self.label_smoothing) * loss - self.label_smoothing * mean_log_p
        mask = ops.cast(ops.not_equal(y_true, 0), loss.dtype)
        if self.words_per_row:
            rows = ops.cast(ops.shape(y_true)[0], loss.dtype)
            return loss * mask / (rows * self.words_per_row)
        return loss * mask / ops.maximum(ops.sum(mask), 1.0)

    def get_config(self):
        return {"label_smoothing": self.label_smoothing, "words_per_row": self.words_per_row,
                "name": self.name}
