//! Host tensors of the CPU reference: real numbers (f32 or f64) or token ids, with a concrete
//! shape.

use super::Real;
use crate::DType;

#[derive(Clone, Debug, PartialEq)]
pub enum Data<T> {
    Real(Vec<T>),
    Int(Vec<i32>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Tensor<T> {
    pub shape: Vec<usize>,
    pub data: Data<T>,
}

impl<T: Real> Tensor<T> {
    pub fn zeros(dtype: DType, shape: Vec<usize>) -> Tensor<T> {
        let n = shape.iter().product();
        let data = if dtype == DType::I32 { Data::Int(vec![0; n]) } else { Data::Real(vec![T::zero(); n]) };
        Tensor { shape, data }
    }

    pub fn real(shape: Vec<usize>, values: Vec<T>) -> Tensor<T> {
        assert_eq!(shape.iter().product::<usize>(), values.len(), "tensor: shape and data differ");
        Tensor { shape, data: Data::Real(values) }
    }

    pub fn ints(shape: Vec<usize>, values: Vec<i32>) -> Tensor<T> {
        assert_eq!(shape.iter().product::<usize>(), values.len(), "tensor: shape and data differ");
        Tensor { shape, data: Data::Int(values) }
    }

    pub fn scalar(x: T) -> Tensor<T> {
        Tensor::real(Vec::new(), vec![x])
    }

    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The real values, or `None` for token ids.
    pub fn reals(&self) -> Option<&[T]> {
        match &self.data {
            Data::Real(v) => Some(v),
            Data::Int(_) => None,
        }
    }

    pub fn reals_mut(&mut self) -> Option<&mut [T]> {
        match &mut self.data {
            Data::Real(v) => Some(v),
            Data::Int(_) => None,
        }
    }

    pub fn ints_ref(&self) -> Option<&[i32]> {
        match &self.data {
            Data::Int(v) => Some(v),
            Data::Real(_) => None,
        }
    }

    /// A real scalar's value.
    pub fn item(&self) -> Option<T> {
        match (&self.data, self.len()) {
            (Data::Real(v), 1) => Some(v[0]),
            _ => None,
        }
    }

    /// The same tensor in another real type.
    pub fn cast<U: Real>(&self) -> Tensor<U> {
        let data = match &self.data {
            Data::Real(v) => Data::Real(v.iter().map(|x| U::of(x.to_f64().unwrap_or(f64::NAN))).collect()),
            Data::Int(v) => Data::Int(v.clone()),
        };
        Tensor { shape: self.shape.clone(), data }
    }
}
