"""Teacher, students, scoring and losses."""

from recdistill.models.caser import Caser, CaserConfig
from recdistill.models.gru4rec import GRU4Rec, GRU4RecConfig
from recdistill.models.llama_student import LlamaStudent, LlamaStudentConfig
from recdistill.models.sasrec import SASRec, SASRecConfig

STUDENTS = {
    "sasrec": (SASRecConfig, SASRec),
    "gru4rec": (GRU4RecConfig, GRU4Rec),
    "caser": (CaserConfig, Caser),
    "llama": (LlamaStudentConfig, LlamaStudent),
}
